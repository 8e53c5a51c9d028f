"""Selected-block attention (NSA's selection branch) in Triton: forward, dQ, and atomic-free dK/dV.

Same semantics as `nsa.ops.reference.selection_attention`: query t of head hq attends over the keys
s <= t of the selection blocks listed in indices[b, t, hs, :], where hs = hq // (HQ // Hs) (Hs = H:
one block set per kv head, shared by its G query heads; Hs = HQ: one per query head).

Kernel layout (docs/KERNELS_SELECTION.md has the numbers behind it):

* Forward and dQ: one program owns a tile of BLOCK_M query rows, a row being one (token, query head)
  of a single kv head: TT consecutive tokens x G heads, TT = BLOCK_M // G (TT = 1 once G >= 16, which
  is the paper's layout). When every row of the tile shares one list (TT = 1, Hs = H) the program
  loops over its n slots. Otherwise it walks the sorted *union* of its rows' lists, precomputed per
  tile: each step loads one block once for the whole tile and masks the rows that did not
  pick it. Consecutive tokens pick mostly the same blocks (the forced initial and local ones, and
  correlated top-n), so small G fills the tensor-core tile without loading K/V more often than one
  token per tile would. The unions come from a small kernel (a bit mask of each list per tile of 32
  blocks, OR-ed over the lists, and a prefix sum; no sort), which also writes, per union block, a
  bit mask of the tile's lists that picked it and how many union blocks end before the tile's first
  token: those are walked first with a per-row mask only (no causal comparison), the rest with the
  full mask. Both walks are counted loops, which
  Triton software-pipelines.
  The forward builds the unions once and returns them; the backward's dQ walks the same ones.
* dK/dV: no atomics. A reverse index (for each kv block, the (token, index head) entries that picked
  it, in token order) is built on device by a counting sort in three launches: per group of rows, how
  many name each block (each row's list as a bit mask per tile of 32 blocks, no compare per block);
  prefix sums over the groups; then each row goes to its block's start + its group's start + the
  group's earlier rows that name the block (a prefix sum over the rows), the order a stable sort
  gives, and the same launch writes the work items. Then one program per work item walks its
  entries and accumulates dK/dV of one block in fp32: first the entries whose token lies before the
  block's last key (they come first in token order; the item counts them), with the causal mask,
  then the rest without it. Heavy blocks (block 0 is forced for every query) are split into several
  items whose fp32 partials a second kernel sums in a fixed order, so one hot block does not
  serialise the backward and results stay bit-for-bit reproducible.
"""

import math

import torch
import triton
import triton.language as tl

from nsa.ops.common import ceil_div
from nsa.ops.utils import LN2_C, LOG2E, LOG2E_C, dot, dot_precision, fitting

# Rows of a forward/dQ tile when G < 16, filled with 64 // G tokens. A trained model's neighbouring
# tokens pick mostly the same blocks, so a tile of more tokens loads fewer blocks per token: at the
# enwik8 model's shape (G = 4) forward and dQ took 0.60-0.67x the time of 16-row tiles on its real
# picks, and 64 rows beat 16, 32 and 128 for G = 1, 2, 4 and 8 (H200, docs/KERNELS_SELECTION.md).
MIN_ROWS = 64
# Query rows per inner step of the dK/dV kernel: 128 measured 1.6x faster than 64 (H100, 64k).
DKV_ROWS = 128
# Launch options of the forward and dQ, the first the measured best (4 warps, Triton's default 3
# stages: with 64-row tiles on an H200, 2 stages was 5-10% slower, 4 stages within 2%, 8 warps 1.9x
# slower), then fewer stages for a card with less shared memory (`utils.fitting`).
WALK_LAUNCHES = (dict(num_warps=4), dict(num_warps=4, num_stages=2), dict(num_warps=4, num_stages=1))
# (rows per step, num_warps, num_stages) of dK/dV, the same way, by layout of its dots (`_sel_dkv_kernel`),
# then fewer stages, then fewer rows. Keys-major for D <= 64: 4 warps and 2 stages (H200, enwik8 model's
# shape, real picks: 0.84-0.86x the time of the rows-major step at G = 4, 0.90-0.95x at G = 8, and +1.7%
# on the training step; with 8 warps it is 2x slower, its dots' M is the block's 64 keys, one warpgroup).
# Rows-major for larger heads: 8 warps (the 64 x 128 fp32 dK and dV accumulators; 4 measured slower on
# an H100), 2 stages. Compiled for sm_90, the keys-major step at D = 128 needs 816 stack bytes against
# the rows-major's 48 (`scripts/kernel_resources.py`), and the paper-shape figures are the rows-major's.
KEYS_MAJOR_MAX_D = 64


def _dkv_launches(warps):
    return ((DKV_ROWS, warps, 2), (DKV_ROWS, warps, 1), (DKV_ROWS // 2, warps, 2), (DKV_ROWS // 2, warps, 1),
            (DKV_ROWS // 4, warps, 1))


DKV_LAUNCHES = {True: _dkv_launches(4), False: _dkv_launches(8)}


def _pow2(x):
    return triton.next_power_of_2(max(int(x), 1))


@triton.jit
def _clean_block(i_j, NB):
    # -1 padding and out-of-range indices both mean "no block": map them past the last block.
    return tl.where((i_j < 0) | (i_j >= NB), NB, i_j)


@triton.jit
def _load_kv_block(k, v, o_kv, i_j, BS, S, H, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # The l' keys of block i_j (o_kv: offset of this (batch, kv head) in k and v), and their positions.
    o_r = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    o_s = i_j * BS + o_r
    m_s = (o_r < BS) & (o_s < S)
    o_sd = o_kv + o_s[:, None].to(tl.int64) * (H * D) + o_d[None, :]
    m_sd = m_s[:, None] & (o_d[None, :] < D)
    return tl.load(k + o_sd, mask=m_sd, other=0.), tl.load(v + o_sd, mask=m_sd, other=0.), o_s, m_s


@triton.jit
def _tile_rows(i_t, i_b, i_h, T, HQ: tl.constexpr, H: tl.constexpr, TT: tl.constexpr, BLOCK_M: tl.constexpr):
    # Rows of a tile: TT consecutive tokens x the G query heads of kv head i_h, token-major. Returns
    # each row's number in the tile, token, mask and row of q (token * HQ + head).
    G: tl.constexpr = HQ // H
    o_r = tl.arange(0, BLOCK_M)
    o_t = i_t * TT + o_r // G
    m_row = (o_r < TT * G) & (o_t < T)
    o_row = (i_b * T + o_t).to(tl.int64) * HQ + i_h * G + o_r % G
    return o_r, o_t, m_row, o_row


@triton.jit
def _walk_setup(o_r, i_t, i_b, i_h, T, HQ: tl.constexpr, HS: tl.constexpr, H: tl.constexpr,
                N_SEL: tl.constexpr, WALK: tl.constexpr):
    # (tile id, first index slot of the tile's token for WALK 0, and for WALK 1 each row's list
    # number within the tile: token * R + index head, R = HS // H, the bit of the row in `ubits`).
    G: tl.constexpr = HQ // H
    R: tl.constexpr = HS // H
    i_tile = (i_b * tl.num_programs(0) + i_t) * H + i_h
    o_tok = ((i_b * T + i_t).to(tl.int64) * HS + i_h) * N_SEL
    o_list = ((o_r // G) * R + (o_r % G) // (G // R)).to(tl.int64)
    return i_tile, o_tok, o_list


@triton.jit
def _walk_bounds(ucnt, i_tile, N_SEL: tl.constexpr, WALK: tl.constexpr):
    # (steps over blocks every row sees whole, all steps). WALK 0: the n slots of the one list, all
    # masked causally. WALK 1: the tile's union; its first ucnt[.., 0] blocks end before the tile's
    # first token, so they need no causal mask.
    if WALK == 0:
        return 0, N_SEL
    else:
        return tl.load(ucnt + i_tile * 2), tl.load(ucnt + i_tile * 2 + 1)


@triton.jit
def _walk_step(i, k, v, o_kv, idx, o_tok, uni, ubits, o_uni, o_list, o_t, i_t, m_row, NB, BS, S, H, D,
               WALK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # K/V tile of step i of the walk, which rows take part (m_hit) and which of their keys are
    # visible (m_vis; only a CAUSAL step compares positions).
    # WALK 0: one token and one shared list for the whole tile, slot i of it (padding masked).
    # WALK 1: block i of the tile's sorted union; a row takes part where its bit is set in ubits.
    if WALK == 0:
        i_j = _clean_block(tl.load(idx + o_tok + i), NB)
        b_k, b_v, o_s, m_s = _load_kv_block(k, v, o_kv, i_j, BS, S, H, D, BLOCK_S, BLOCK_D)
        m_hit = m_row & (i_j < NB)
        m_vis = m_hit[:, None] & m_s[None, :] & (o_s[None, :] <= i_t)
    else:
        i_j = tl.load(uni + o_uni + i)
        b_k, b_v, o_s, m_s = _load_kv_block(k, v, o_kv, i_j, BS, S, H, D, BLOCK_S, BLOCK_D)
        m_hit = ((tl.load(ubits + o_uni + i) >> o_list) & 1) != 0
        if CAUSAL:
            m_vis = m_hit[:, None] & m_s[None, :] & (o_s[None, :] <= o_t[:, None])
        else:
            m_vis = m_hit[:, None] & m_s[None, :]
    return b_k, b_v, m_hit, m_vis


@triton.jit
def _online_softmax_step(b_q, b_k, b_v, m_hit, m_vis, b_m, b_l, b_acc, scale_log2, MASK: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr):
    b_s = dot(b_q, tl.trans(b_k), PREC, UPCAST)
    if MASK:
        b_s = tl.where(m_vis, b_s * scale_log2, float("-inf"))
    else:
        # A whole block: only the rows that did not pick it are hidden, by a -inf bias per row (one
        # fused multiply-add per score instead of building and applying a [rows, keys] mask).
        b_s = b_s * scale_log2 + tl.where(m_hit, 0., float("-inf"))[:, None]
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    # Rows with nothing visible yet keep m = -inf; shift them by 0 so no inf - inf appears.
    b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, PREC, UPCAST)
    return b_m_new, b_l, b_acc


@triton.jit
def _dq_step(b_q, b_do, b_k, b_v, m_hit, m_vis, b_lse2, b_delta, b_dq, scale_log2, MASK: tl.constexpr,
             PREC: tl.constexpr, UPCAST: tl.constexpr):
    b_s = dot(b_q, tl.trans(b_k), PREC, UPCAST)
    if MASK:
        b_p = tl.where(m_vis, tl.exp2(b_s * scale_log2 - b_lse2[:, None]), 0.)
    else:
        # A whole block: rows that did not pick it get lse = +inf, so their p is exp2(-inf) = 0.
        b_p = tl.exp2(b_s * scale_log2 - tl.where(m_hit, b_lse2, float("inf"))[:, None])
    b_dp = dot(b_do, tl.trans(b_v), PREC, UPCAST)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + dot(b_ds.to(b_k.dtype), b_k, PREC, UPCAST)


# Lengths unspecialised, as the range forward: a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["T", "S", "UL"])
def _sel_fwd_kernel(q, k, v, o, lse, idx, uni, ubits, ucnt, T, S, BS, UL, scale_log2,
                    HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, N_SEL: tl.constexpr,
                    TT: tl.constexpr, WALK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                    MASK_S: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # WALK 0: one token, one shared list (fixed loop over the n slots); 1: counted loops over the
    # precomputed union `uni` (UL slots per tile): first the blocks that end before the tile's first
    # token (no causal mask), then the rest. BLOCK_S is l' rounded up to a power of two; MASK_S: it is
    # larger than l', so even a whole block masks its padding keys.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NB = tl.cdiv(S, BS)
    o_r, o_t, m_row, o_row = _tile_rows(i_t, i_b, i_h, T, HQ, H, TT, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_qd = m_row[:, None] & (o_d[None, :] < D)
    b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_qd, other=0.)
    o_kv = i_b.to(tl.int64) * S * H * D + i_h * D
    i_tile, o_tok, o_list = _walk_setup(o_r, i_t, i_b, i_h, T, HQ, HS, H, N_SEL, WALK)
    o_uni = i_tile.to(tl.int64) * UL
    n_whole, n_all = _walk_bounds(ucnt, i_tile, N_SEL, WALK)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, n_whole):
        b_k, b_v, m_hit, m_vis = _walk_step(i, k, v, o_kv, idx, o_tok, uni, ubits, o_uni, o_list, o_t, i_t, m_row,
                                            NB, BS, S, H, D, WALK, False, BLOCK_S, BLOCK_D)
        b_m, b_l, b_acc = _online_softmax_step(b_q, b_k, b_v, m_hit, m_vis, b_m, b_l, b_acc, scale_log2, MASK_S,
                                               PREC, UPCAST)
    for i in tl.range(n_whole, n_all):
        b_k, b_v, m_hit, m_vis = _walk_step(i, k, v, o_kv, idx, o_tok, uni, ubits, o_uni, o_list, o_t, i_t, m_row,
                                            NB, BS, S, H, D, WALK, True, BLOCK_S, BLOCK_D)
        b_m, b_l, b_acc = _online_softmax_step(b_q, b_k, b_v, m_hit, m_vis, b_m, b_l, b_acc, scale_log2, True,
                                               PREC, UPCAST)

    # A row that saw no key gets o = 0 and lse = -inf, as in the reference.
    m_empty = b_l == 0.
    b_l_safe = tl.where(m_empty, 1., b_l)
    b_o = b_acc / b_l_safe[:, None]
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(b_l_safe)) * LN2_C)
    tl.store(o + o_row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_qd)
    tl.store(lse + o_row, b_lse, mask=m_row)


@triton.jit
def _sel_dq_kernel(q, k, v, o, do, lse, delta, dq, idx, uni, ubits, ucnt, T, S, BS, UL, scale, scale_log2,
                   HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, N_SEL: tl.constexpr,
                   TT: tl.constexpr, WALK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   MASK_S: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Same tiling and block walks as _sel_fwd_kernel; P is recomputed from the saved log-sum-exp. Every
    # row lies in exactly one tile, so this kernel also writes delta = rowsum(o * do) for dK/dV.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NB = tl.cdiv(S, BS)
    o_r, o_t, m_row, o_row = _tile_rows(i_t, i_b, i_h, T, HQ, H, TT, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_qd = m_row[:, None] & (o_d[None, :] < D)
    b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_qd, other=0.)
    b_do = tl.load(do + o_row[:, None] * D + o_d[None, :], mask=m_qd, other=0.)
    # lse = -inf (a row that saw nothing) becomes +inf so that exp2(s - lse) is 0, not NaN.
    b_lse = tl.load(lse + o_row, mask=m_row, other=float("-inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_C)
    b_o = tl.load(o + o_row[:, None] * D + o_d[None, :], mask=m_qd, other=0.)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
    tl.store(delta + o_row, b_delta, mask=m_row)
    o_kv = i_b.to(tl.int64) * S * H * D + i_h * D
    i_tile, o_tok, o_list = _walk_setup(o_r, i_t, i_b, i_h, T, HQ, HS, H, N_SEL, WALK)
    o_uni = i_tile.to(tl.int64) * UL
    n_whole, n_all = _walk_bounds(ucnt, i_tile, N_SEL, WALK)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, n_whole):
        b_k, b_v, m_hit, m_vis = _walk_step(i, k, v, o_kv, idx, o_tok, uni, ubits, o_uni, o_list, o_t, i_t, m_row,
                                            NB, BS, S, H, D, WALK, False, BLOCK_S, BLOCK_D)
        b_dq = _dq_step(b_q, b_do, b_k, b_v, m_hit, m_vis, b_lse2, b_delta, b_dq, scale_log2, MASK_S, PREC, UPCAST)
    for i in tl.range(n_whole, n_all):
        b_k, b_v, m_hit, m_vis = _walk_step(i, k, v, o_kv, idx, o_tok, uni, ubits, o_uni, o_list, o_t, i_t, m_row,
                                            NB, BS, S, H, D, WALK, True, BLOCK_S, BLOCK_D)
        b_dq = _dq_step(b_q, b_do, b_k, b_v, m_hit, m_vis, b_lse2, b_delta, b_dq, scale_log2, True, PREC, UPCAST)
    tl.store(dq + o_row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_qd)


@triton.jit
def _dkv_rows(q, do, lse, delta, entries, i_e, i_hi, i_b, T, HQ: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
              BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # The query rows of entries [i_e, i_e + BLOCK_E) (those below i_hi): q, dO, lse in log2 units (+inf
    # for a padded row or one that saw nothing, so its p is 0 with no mask), delta, and each row's
    # token and mask. An entry t * HS + hs stands for the GS = HQ // HS query heads sharing index head hs.
    GS: tl.constexpr = HQ // HS
    o_r = tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_D)
    o_e = i_e + o_r // GS
    m_e = (o_r < BLOCK_E * GS) & (o_e < i_hi)
    b_ent = tl.load(entries + o_e, mask=m_e, other=0)
    o_t = b_ent // HS
    o_row = (i_b * T + o_t).to(tl.int64) * HQ + (b_ent % HS) * GS + o_r % GS
    m_rd = m_e[:, None] & (o_d < D)[None, :]
    b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_rd, other=0.)
    b_do = tl.load(do + o_row[:, None] * D + o_d[None, :], mask=m_rd, other=0.)
    b_lse = tl.load(lse + o_row, mask=m_e, other=float("-inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_C)
    b_delta = tl.load(delta + o_row, mask=m_e, other=0.)
    return b_q, b_do, b_lse2, b_delta, o_t, m_e


@triton.jit
def _dkv_step(b_dk, b_dv, b_k, b_v, o_s, m_s, b_q, b_do, b_lse2, b_delta, o_t, m_e, scale_log2,
              CAUSAL: tl.constexpr, KEYS_MAJOR: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # One step of dK/dV over a set of query rows; CAUSAL: some row's token lies before the block's last
    # key, so keys are masked by position (otherwise every row sees every key: padded rows have p = 0
    # by their lse, and a padding key's row of dK/dV is never stored).
    if KEYS_MAJOR:
        # S^T = K Q^T: P^T and dS^T come out of their dots already in the layout of the next dot's
        # left operand, so no [rows, keys] tile is transposed in registers.
        b_s_t = dot(b_k, tl.trans(b_q), PREC, UPCAST) * scale_log2
        b_p_t = tl.exp2(b_s_t - b_lse2[None, :])
        if CAUSAL:
            b_p_t = tl.where(m_s[:, None] & m_e[None, :] & (o_s[:, None] <= o_t[None, :]), b_p_t, 0.)
        b_dv += dot(b_p_t.to(b_do.dtype), b_do, PREC, UPCAST)
        b_dp_t = dot(b_v, tl.trans(b_do), PREC, UPCAST)
        b_ds_t = b_p_t * (b_dp_t - b_delta[None, :])
        b_dk += dot(b_ds_t.to(b_q.dtype), b_q, PREC, UPCAST)
    else:
        b_s = dot(b_q, tl.trans(b_k), PREC, UPCAST) * scale_log2
        b_p = tl.exp2(b_s - b_lse2[:, None])
        if CAUSAL:
            b_p = tl.where(m_e[:, None] & m_s[None, :] & (o_s[None, :] <= o_t[:, None]), b_p, 0.)
        b_dv += dot(tl.trans(b_p.to(b_do.dtype)), b_do, PREC, UPCAST)
        b_dp = dot(b_do, tl.trans(b_v), PREC, UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += dot(tl.trans(b_ds.to(b_q.dtype)), b_q, PREC, UPCAST)
    return b_dk, b_dv


# Entries counted per step when an item finds where its causal part ends (int32 loads, cheap next to
# the 2 * GS * D values a step loads for each entry).
COUNT_ENTRIES = tl.constexpr(1024)


@triton.jit
def _sel_dkv_kernel(q, k, v, do, lse, delta, dk, dv, part_dk, part_dv, entries,
                    item_key, item_lo, item_hi, item_slot, T, S, BS, scale, scale_log2,
                    HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                    KEYS_MAJOR: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # One work item: a slice [lo, hi) of the entries that picked kv block `key` = (b, h, j).
    i_w = tl.program_id(0)
    i_key = tl.load(item_key + i_w)
    if i_key >= 0:
        NB = tl.cdiv(S, BS)
        i_j = i_key % NB
        i_b = i_key // NB // H
        i_h = i_key // NB % H
        i_lo = tl.load(item_lo + i_w)
        i_hi = tl.load(item_hi + i_w)
        o_kv = i_b.to(tl.int64) * S * H * D + i_h * D
        b_k, b_v, o_s, m_s = _load_kv_block(k, v, o_kv, i_j, BS, S, H, D, BLOCK_S, BLOCK_D)
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        # A key's entries are in token order, so the rows that may miss some of the block's keys (token
        # before its last key) come first: count them, walk them with the causal mask, the rest
        # (nearly all: 64 tokens a block against about a thousand entries at 8k) without it.
        n_causal = 0
        for i_c in range(i_lo, i_hi, COUNT_ENTRIES):
            o_c = i_c + tl.arange(0, COUNT_ENTRIES)
            b_c = tl.load(entries + o_c, mask=o_c < i_hi, other=2**31 - 1)
            n_causal += tl.sum((b_c < ((i_j + 1) * BS - 1) * HS).to(tl.int32), 0)
        i_mid = tl.minimum(i_lo + tl.cdiv(n_causal, BLOCK_E) * BLOCK_E, i_hi)

        b_dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for i_e in tl.range(i_lo, i_mid, BLOCK_E):
            b_q, b_do, b_lse2, b_delta, o_t, m_e = _dkv_rows(q, do, lse, delta, entries, i_e, i_hi, i_b, T, HQ, HS,
                                                             D, BLOCK_E, BLOCK_R, BLOCK_D)
            b_dk, b_dv = _dkv_step(b_dk, b_dv, b_k, b_v, o_s, m_s, b_q, b_do, b_lse2, b_delta, o_t, m_e, scale_log2,
                                   True, KEYS_MAJOR, PREC, UPCAST)
        for i_e in tl.range(i_mid, i_hi, BLOCK_E):
            b_q, b_do, b_lse2, b_delta, o_t, m_e = _dkv_rows(q, do, lse, delta, entries, i_e, i_hi, i_b, T, HQ, HS,
                                                             D, BLOCK_E, BLOCK_R, BLOCK_D)
            b_dk, b_dv = _dkv_step(b_dk, b_dv, b_k, b_v, o_s, m_s, b_q, b_do, b_lse2, b_delta, o_t, m_e, scale_log2,
                                   False, KEYS_MAJOR, PREC, UPCAST)
        b_dk *= scale

        i_slot = tl.load(item_slot + i_w)
        if i_slot < 0:
            # The block's only item: write the gradient directly.
            o_sd = o_kv + o_s[:, None].to(tl.int64) * (H * D) + o_d[None, :]
            m_sd = m_s[:, None] & m_d[None, :]
            tl.store(dk + o_sd, b_dk.to(dk.dtype.element_ty), mask=m_sd)
            tl.store(dv + o_sd, b_dv.to(dv.dtype.element_ty), mask=m_sd)
        else:
            o_rs = tl.arange(0, BLOCK_S)
            o_part = i_slot.to(tl.int64) * (BLOCK_S * BLOCK_D) + o_rs[:, None] * BLOCK_D + o_d[None, :]
            tl.store(part_dk + o_part, b_dk)
            tl.store(part_dv + o_part, b_dv)


@triton.jit
def _sel_dkv_reduce_kernel(part_dk, part_dv, dk, dv, key_items, key_first_slot, S, BS,
                           H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Sum the fp32 partials of a split block in item order: deterministic, no atomics.
    i_key = tl.program_id(0)
    n_items = tl.load(key_items + i_key)
    if n_items > 1:
        NB = tl.cdiv(S, BS)
        i_j = i_key % NB
        i_b = i_key // NB // H
        i_h = i_key // NB % H
        i_first = tl.load(key_first_slot + i_key)
        o_r = tl.arange(0, BLOCK_S)
        o_d = tl.arange(0, BLOCK_D)
        o_part = o_r[:, None] * BLOCK_D + o_d[None, :]
        b_dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for i in range(n_items):
            o_slot = (i_first + i).to(tl.int64) * (BLOCK_S * BLOCK_D)
            b_dk += tl.load(part_dk + o_slot + o_part)
            b_dv += tl.load(part_dv + o_slot + o_part)
        o_s = i_j * BS + o_r
        m_s = (o_r < BS) & (o_s < S)
        o_sd = (i_b.to(tl.int64) * S * H * D + i_h * D) + o_s[:, None].to(tl.int64) * (H * D) + o_d[None, :]
        m_sd = m_s[:, None] & (o_d[None, :] < D)
        tl.store(dk + o_sd, b_dk.to(dk.dtype.element_ty), mask=m_sd)
        tl.store(dv + o_sd, b_dv.to(dv.dtype.element_ty), mask=m_sd)


def _launch_cfg(q, k, indices, sel_block):
    """Constexprs and grid of the forward and dQ kernels. When G < 16 a tile holds MIN_ROWS rows,
    TT = MIN_ROWS // G tokens; otherwise one token's G heads (G rounded up to a power of two). One
    token with one shared list walks its n slots (WALK 0); anything else walks the sorted union of its
    rows' lists (WALK 1), whose row masks are one int64 per block: at most 64 lists a tile."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    Hs, n = indices.shape[2], indices.shape[3]
    block_m = _pow2(HQ // H) if HQ // H >= 16 else MIN_ROWS
    tt = max(1, block_m // (HQ // H))
    walk = 0 if tt == 1 and Hs == H else 1
    if walk == 1 and tt * (Hs // H) > 64:
        raise ValueError(f"a selection tile holds at most 64 block lists; got {tt} tokens x {Hs // H} index heads "
                         "per kv head")
    prec, upcast = dot_precision(q.dtype)
    block_s = max(16, _pow2(sel_block))
    return dict(HQ=HQ, H=H, HS=Hs, D=D, N_SEL=n, TT=tt, WALK=walk, BLOCK_M=block_m, BLOCK_S=block_s,
                MASK_S=block_s != sel_block, BLOCK_D=max(16, _pow2(D)), PREC=prec, UPCAST=upcast), \
        (ceil_div(T, tt), B * H)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _row_picks(idx, o_r, m_r, i_b, i_h, T, HS: tl.constexpr, H: tl.constexpr, N_SEL: tl.constexpr,
               N_P2: tl.constexpr):
    # [rows, N_P2] block lists of rows o_r of kv head (i_b, i_h) (row r: token r // R, index head
    # i_h * R + r % R, R = HS / H), -1 past the list and for masked rows.
    R: tl.constexpr = HS // H
    o_s = tl.arange(0, N_P2)
    o_row = ((i_b * T + o_r // R).to(tl.int64) * HS + i_h * R + o_r % R) * N_SEL
    return tl.load(idx + o_row[:, None] + o_s[None, :], mask=m_r[:, None] & (o_s[None, :] < N_SEL), other=-1)


@triton.jit
def _tile_mask(b_p, j0, NB, BLOCK_J: tl.constexpr):
    # [rows] int32: bit jj set where the row's list b_p [rows, slots] names block j0 + jj (BLOCK_J <= 32).
    # Each list is compared once per tile of blocks, not once per block; -1 and picks >= NB name none.
    b_d = b_p - j0
    m_in = (b_d >= 0) & (b_d < BLOCK_J) & (b_p < NB)
    return tl.reduce(tl.where(m_in, 1 << tl.where(m_in, b_d, 0), 0), 1, _bit_or)


@triton.jit
def _largest_pick(b_p, NB):
    # The largest block the lists b_p [rows, slots] name, -1 if none (-1 and picks >= NB name none).
    return tl.max(tl.max(tl.where(b_p < NB, b_p, -1), 1), 0)


# Lengths unspecialised (as _sel_fwd_kernel).
@triton.jit(do_not_specialize=["T", "S", "NB", "UL"])
def _tile_union_kernel(idx, uni, ubits, cnt, T, S, BS, NB, UL, HS: tl.constexpr, H: tl.constexpr,
                       N_SEL: tl.constexpr, N_P2: tl.constexpr, TT: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_J: tl.constexpr):
    # One tile (TT tokens x the R = HS / H index heads of kv head i_h, list l = token * R + head):
    # which of the blocks 0..NB-1 any of its lists names, written in ascending order, with the bit mask
    # of the lists that name each. Per tile of BLOCK_J blocks each list becomes one int32 bit mask (its
    # n picks compared once), the lists' masks OR-ed give the tile's blocks, a prefix sum their slots.
    # No sort, and the same result on every run.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    R: tl.constexpr = HS // H
    o_l = tl.arange(0, BLOCK_L)
    m_l = (o_l < TT * R) & (i_t * TT + o_l // R < T)
    b_p = _row_picks(idx, i_t * TT * R + o_l, m_l, i_b, i_h, T, HS, H, N_SEL, N_P2)
    b_lbit = tl.full([BLOCK_L], 1, tl.int64) << o_l.to(tl.int64)
    # Blocks below j_whole end at or before the tile's first token (and inside S): every row that
    # picked one sees all its keys.
    j_whole = tl.minimum((i_t * TT + 1) // BS, S // BS)
    o_tile = ((i_b * tl.num_programs(0) + i_t) * H + i_h).to(tl.int64)
    # Blocks past the tile's largest pick hold none of its lists (under causal picks, every block after
    # its last token): the walk stops there.
    j_end = _largest_pick(b_p, NB) + 1
    n = 0
    n_whole = 0
    for j0 in range(0, j_end, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        b_named = (_tile_mask(b_p, j0, NB, BLOCK_J)[:, None] >> tl.arange(0, BLOCK_J)[None, :]) & 1
        b_hit = tl.max(b_named, 0)
        b_bits = tl.reduce(tl.where(b_named != 0, b_lbit[:, None], 0), 0, _bit_or)
        o_pos = n + tl.cumsum(b_hit, axis=0) - b_hit
        m_pos = (b_hit > 0) & (o_pos < UL)
        tl.store(uni + o_tile * UL + o_pos, o_j, mask=m_pos)
        tl.store(ubits + o_tile * UL + o_pos, b_bits, mask=m_pos)
        n += tl.sum(b_hit, axis=0)
        n_whole += tl.sum(b_hit * (o_j < j_whole), axis=0)
    for p0 in range(n, UL, BLOCK_J):
        o_p = p0 + tl.arange(0, BLOCK_J)
        tl.store(uni + o_tile * UL + o_p, tl.full([BLOCK_J], NB, tl.int32), mask=o_p < UL)
        tl.store(ubits + o_tile * UL + o_p, tl.zeros([BLOCK_J], tl.int64), mask=o_p < UL)
    tl.store(cnt + o_tile * 2, n_whole)
    tl.store(cnt + o_tile * 2 + 1, n)


def _union_shapes(index_shape, H, S, sel_block, tt):
    """(shape, dtype) of `_tile_union`'s uni, bits and cnt for indices of `index_shape` [B, T, Hs, n]:
    one row per tile, UL = min(a tile's entries, NB) slots."""
    B, T, Hs, n = index_shape
    nt, ul = ceil_div(T, tt), min(tt * (Hs // H) * n, ceil_div(S, sel_block))
    return ((B, nt, H, ul), torch.int32), ((B, nt, H, ul), torch.int64), ((B, nt, H, 2), torch.int32)


def _tile_union(indices, H, S, sel_block, tt):
    """Sorted union of the block lists of each forward/dQ tile, on device and with no host sync.

    Returns uni [B, ceil(T / tt), H, UL] int32 (a tile's distinct valid blocks ascending, then NB),
    bits [B, ceil(T / tt), H, UL] int64 (bit l set where the tile's list l names that block; list
    l = token * R + index head, R = Hs / H) and cnt [B, ceil(T / tt), H, 2] int32 (how many of the
    blocks end before the tile's first token, how many are valid). A tile's lists are those of its tt
    tokens and of the R index heads of its kv head; -1 and indices >= NB are not blocks.
    """
    B, T, Hs, n = indices.shape
    NB = ceil_div(S, sel_block)
    uni, bits, cnt = (torch.empty(shape, dtype=dtype, device=indices.device)
                      for shape, dtype in _union_shapes(indices.shape, H, S, sel_block, tt))
    nt, ul = uni.shape[1], uni.shape[3]
    # Bit masks of int32: at most 32 blocks a step, and no more than there are blocks (short sequences).
    block_j = max(2, min(32, _pow2(NB)))
    _tile_union_kernel[(nt, B * H)](indices, uni, bits, cnt, T, S, sel_block, NB, ul, HS=Hs, H=H, N_SEL=n,
                                    N_P2=_pow2(n), TT=tt, BLOCK_L=_pow2(tt * (Hs // H)), BLOCK_J=block_j,
                                    num_warps=4)
    return uni, bits, cnt


def tile_walk(q, k, indices, sel_block):
    """(uni, bits, cnt) of the forward's and dQ's union walk (`_tile_union`), or three empty int32
    tensors when the tiles walk their one shared list. The forward builds it and the backward reuses
    it: the same tiles walk the same unions."""
    cfg, _ = _launch_cfg(q, k, indices, sel_block)
    if cfg["WALK"] != 1:
        return tuple(indices.new_empty(0) for _ in range(3))
    return _tile_union(indices, cfg["H"], k.shape[1], sel_block, cfg["TT"])


def _walk_shapes(q, k, indices, sel_block):
    """Shapes and dtypes of `tile_walk`'s tensors, from the input shapes alone (the fake kernel's)."""
    cfg, _ = _launch_cfg(q, k, indices, sel_block)
    if cfg["WALK"] != 1:
        return ((0,), torch.int32), ((0,), torch.int32), ((0,), torch.int32)
    return _union_shapes(indices.shape, cfg["H"], k.shape[1], sel_block, cfg["TT"])


def _walk_args(cfg, walk, indices):
    """Kernel arguments (uni, bits, cnt, UL) of a `tile_walk` for the launch `cfg`; the index tensor as
    a dummy for the one-list walk, which reads none of them."""
    if cfg["WALK"] != 1:
        return indices, indices, indices, 1
    uni, bits, cnt = walk
    return uni, bits, cnt, uni.shape[-1]


# The reverse index's counting sort: rows (token, index head) of one kv head per program, in steps of
# SORT_STEP_ROWS for lists of up to 16 slots (fewer for longer ones, so the [rows, slots] load stays
# small); blocks in tiles of SORT_BLOCKS, one int32 bit mask per row and tile.
SORT_ROWS = 256
SORT_STEP_ROWS = 64
SORT_BLOCKS = 32


@triton.jit
def _named(idx, o_r, m_r, i_b, i_h, j0, T, NB, HS: tl.constexpr, H: tl.constexpr, N_SEL: tl.constexpr,
           N_P2: tl.constexpr, BLOCK_J: tl.constexpr):
    # [rows, BLOCK_J] 0 / 1: whether row o_r names block j0 + jj. Lists are distinct (as select_blocks
    # gives them); a repeat would be named once, by the count and the placement alike, so the two agree.
    b_mask = _tile_mask(_row_picks(idx, o_r, m_r, i_b, i_h, T, HS, H, N_SEL, N_P2), j0, NB, BLOCK_J)
    return (b_mask[:, None] >> tl.arange(0, BLOCK_J)[None, :]) & 1


@triton.jit(do_not_specialize=["T", "NB", "NG"])
def _dkv_count_kernel(idx, base, T, NB, NG, HS: tl.constexpr, H: tl.constexpr, N_SEL: tl.constexpr,
                      N_P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    # Group i_g of kv head (b, h)'s rows (ROWS of them, in (t, hs) order): how many name each block j,
    # into base[b, h, i_g, j].
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    r_end = tl.minimum((i_g + 1) * ROWS, T * (HS // H))
    o_grp = (i_bh.to(tl.int64) * NG + i_g) * NB
    # The group's largest pick: tiles past it are zero without a pass over the rows (under causal picks
    # every block after the group's last token, half the tiles on average).
    j_max = -1
    for r0 in range(i_g * ROWS, r_end, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        b_p = _row_picks(idx, o_r, o_r < r_end, i_b, i_h, T, HS, H, N_SEL, N_P2)
        j_max = tl.maximum(j_max, _largest_pick(b_p, NB))
    for j0 in range(0, NB, BLOCK_J):
        b_n = tl.zeros([BLOCK_J], dtype=tl.int32)
        if j0 <= j_max:
            for r0 in range(i_g * ROWS, r_end, BLOCK_R):
                o_r = r0 + tl.arange(0, BLOCK_R)
                b_n += tl.sum(_named(idx, o_r, o_r < r_end, i_b, i_h, j0, T, NB, HS, H, N_SEL, N_P2, BLOCK_J), 0)
        o_j = j0 + tl.arange(0, BLOCK_J)
        tl.store(base + o_grp + o_j, b_n, mask=o_j < NB)


@triton.jit(do_not_specialize=["NB", "NG"])
def _dkv_scan_kernel(base, tot, NB, NG, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    # Per block j of kv head (b, h): its groups' counts become their exclusive prefix sum (where each
    # group's entries start among the block's), and the block's total goes to tot.
    i_j, i_bh = tl.program_id(0), tl.program_id(1)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_j = o_j < NB
    b_sum = tl.zeros([BLOCK_J], dtype=tl.int32)
    for g0 in range(0, NG, BLOCK_G):
        o_g = g0 + tl.arange(0, BLOCK_G)
        o_n = (i_bh.to(tl.int64) * NG + o_g[:, None]) * NB + o_j[None, :]
        m_n = (o_g[:, None] < NG) & m_j[None, :]
        b_n = tl.load(base + o_n, mask=m_n, other=0)
        tl.store(base + o_n, b_sum[None, :] + tl.cumsum(b_n, 0) - b_n, mask=m_n)
        b_sum += tl.sum(b_n, 0)
    tl.store(tot + i_bh * NB + o_j, b_sum, mask=m_j)


@triton.jit
def _key_items(b_tot, m_k, chunk):
    # Work items of each key: its entries in slices of at most `chunk`, and one item when it has none.
    return tl.where(m_k, tl.maximum((b_tot + chunk - 1) // chunk, 1), 0)


@triton.jit
def _keys_before(tot, n_keys, chunk, BLOCK_K: tl.constexpr):
    # Entries, work items and partial slots (those of split keys' items) of keys 0 .. n_keys - 1.
    b_ent = tl.zeros([BLOCK_K], dtype=tl.int64)
    b_item = tl.zeros([BLOCK_K], dtype=tl.int32)
    b_hot = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, n_keys, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < n_keys
        b_tot = tl.load(tot + o_k, mask=m_k, other=0)
        b_ki = _key_items(b_tot, m_k, chunk)
        b_ent += b_tot
        b_item += b_ki
        b_hot += tl.where(b_ki > 1, b_ki, 0)
    return tl.sum(b_ent, 0), tl.sum(b_item, 0), tl.sum(b_hot, 0)


@triton.jit
def _place_group(idx, base, tot, entries, i_g, i_bh, T, NB, NG, chunk, HS: tl.constexpr, H: tl.constexpr,
                 N_SEL: tl.constexpr, N_P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    # Row r of group i_g naming block j is entry t * HS + hs at: where key (b, h, j)'s entries start +
    # where the group's start among them + the group's rows before r that name j. That is the order
    # a stable sort by key gives, and a tile the group names no block of is skipped (under causal
    # picks, every block past its last token).
    R: tl.constexpr = HS // H
    i_b, i_h = i_bh // H, i_bh % H
    r_end = tl.minimum((i_g + 1) * ROWS, T * R)
    o_key = i_bh * NB
    o_grp = (i_bh.to(tl.int64) * NG + i_g) * NB
    o_next = (i_bh.to(tl.int64) * NG + tl.minimum(i_g + 1, NG - 1)) * NB
    n_start, _, _ = _keys_before(tot, o_key, chunk, BLOCK_K)
    for j0 in range(0, NB, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < NB
        b_tot = tl.load(tot + o_key + o_j, mask=m_j, other=0)
        b_lo = tl.load(base + o_grp + o_j, mask=m_j, other=0)
        b_hi = tl.where(i_g + 1 < NG, tl.load(base + o_next + o_j, mask=m_j, other=0), b_tot)
        b_pos = n_start + tl.cumsum(b_tot, 0) - b_tot + b_lo
        n_start += tl.sum(b_tot, 0)
        if tl.sum(b_hi - b_lo, 0) > 0:
            for r0 in range(i_g * ROWS, r_end, BLOCK_R):
                o_r = r0 + tl.arange(0, BLOCK_R)
                b_hit = _named(idx, o_r, o_r < r_end, i_b, i_h, j0, T, NB, HS, H, N_SEL, N_P2, BLOCK_J)
                b_val = (o_r // R) * HS + i_h * R + o_r % R
                tl.store(entries + b_pos[None, :] + tl.cumsum(b_hit, 0) - b_hit, b_val[:, None], mask=b_hit > 0)
                b_pos += tl.sum(b_hit, 0)


@triton.jit
def _write_items(tot, item_key, item_lo, item_hi, item_slot, key_items, key_first_slot, i_bh, NB, chunk, n_work,
                 BLOCK_K: tl.constexpr):
    # The work items of kv head i_bh's keys, in key order: a key's items slice its entries in order,
    # and a split key's items write partials to consecutive slots. The last kv head's program also
    # fills the grid's spare items: no key, an empty slice.
    n_ent, n_item, n_hot = _keys_before(tot, i_bh * NB, chunk, BLOCK_K)
    for k0 in range(0, NB, BLOCK_K):
        m_k = k0 + tl.arange(0, BLOCK_K) < NB
        o_k = i_bh * NB + k0 + tl.arange(0, BLOCK_K)
        b_tot = tl.load(tot + o_k, mask=m_k, other=0)
        b_ki = _key_items(b_tot, m_k, chunk)
        b_hot = tl.where(b_ki > 1, b_ki, 0)
        b_lo = n_ent + tl.cumsum(b_tot, 0) - b_tot
        b_w = n_item + tl.cumsum(b_ki, 0) - b_ki
        b_slot = n_hot + tl.cumsum(b_hot, 0) - b_hot
        tl.store(key_items + o_k, b_ki, mask=m_k)
        tl.store(key_first_slot + o_k, b_slot, mask=m_k)
        for i in range(0, tl.max(b_ki, 0)):
            m_i = i < b_ki
            o_lo = b_lo + i * chunk
            tl.store(item_key + b_w + i, o_k, mask=m_i)
            tl.store(item_lo + b_w + i, o_lo, mask=m_i)
            tl.store(item_hi + b_w + i, tl.minimum(o_lo + chunk, b_lo + b_tot), mask=m_i)
            tl.store(item_slot + b_w + i, tl.where(b_ki > 1, b_slot + i, -1), mask=m_i)
        n_ent += tl.sum(b_tot, 0)
        n_item += tl.sum(b_ki, 0)
        n_hot += tl.sum(b_hot, 0)
    if i_bh == tl.num_programs(1) - 1:
        for w0 in range(n_item, n_work, BLOCK_K):
            o_w = w0 + tl.arange(0, BLOCK_K)
            m_w = o_w < n_work
            tl.store(item_key + o_w, tl.full([BLOCK_K], -1, tl.int32), mask=m_w)
            tl.store(item_lo + o_w, tl.zeros([BLOCK_K], tl.int64) + n_ent, mask=m_w)
            tl.store(item_hi + o_w, tl.zeros([BLOCK_K], tl.int64) + n_ent, mask=m_w)
            tl.store(item_slot + o_w, tl.full([BLOCK_K], -1, tl.int32), mask=m_w)


@triton.jit(do_not_specialize=["T", "NB", "NG", "chunk", "n_work"])
def _dkv_place_kernel(idx, base, tot, entries, item_key, item_lo, item_hi, item_slot, key_items, key_first_slot,
                      T, NB, NG, chunk, n_work, HS: tl.constexpr, H: tl.constexpr, N_SEL: tl.constexpr,
                      N_P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # Programs 0 .. NG - 1 of kv head i_bh place its row groups' entries; program NG writes its items.
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    if i_g < NG:
        _place_group(idx, base, tot, entries, i_g, i_bh, T, NB, NG, chunk, HS, H, N_SEL, N_P2, ROWS, BLOCK_R,
                     BLOCK_J, BLOCK_K)
    else:
        _write_items(tot, item_key, item_lo, item_hi, item_slot, key_items, key_first_slot, i_bh, NB, chunk,
                     n_work, BLOCK_K)


def _dkv_chunk(total, n_keys):
    """Entries per dK/dV work item: twice the mean per key (the tests shrink it to split every block)."""
    return max(64, ceil_div(2 * total, n_keys))


def _dkv_items(indices, H, S, sel_block):
    """Reverse index and work items for the dK/dV kernel: a counting sort in three launches, no host sync.

    Returns entries (int32 t * Hs + hs, grouped by kv block key (b, h, j) and in (t, hs) order within
    a key; past the valid entries, unwritten), per-item (key, lo, hi, slot), per-key (number of items,
    first partial slot), and the number of partial slots to allocate. Every key gets at least one
    item, so blocks nobody picked still get their (zero) gradient written; spare items have key -1,
    slot -1 and an empty slice. -1 and indices >= NB name no block; a block one list names twice is
    one entry.
    """
    B, T, Hs, n = indices.shape
    dev = indices.device
    NB = ceil_div(S, sel_block)
    NK = B * H * NB
    total = B * T * Hs * n
    # Items hold at most `chunk` entries, twice the mean per key: no item is much heavier than the
    # average block, and at most NK + total // chunk items and 2 * total // chunk partials exist.
    chunk = _dkv_chunk(total, NK)
    n_work = NK + total // chunk
    ng = ceil_div(T * (Hs // H), SORT_ROWS)
    base = torch.empty(B * H, ng, NB, dtype=torch.int32, device=dev)
    tot = torch.empty(NK, dtype=torch.int32, device=dev)
    entries = torch.empty(total, dtype=torch.int32, device=dev)
    item_key, item_lo, item_hi, item_slot = (torch.empty(n_work, dtype=torch.int64, device=dev) for _ in range(4))
    key_items, key_first_slot = (torch.empty(NK, dtype=torch.int64, device=dev) for _ in range(2))
    n_p2 = _pow2(n)
    meta = dict(HS=Hs, H=H, N_SEL=n, N_P2=n_p2, ROWS=SORT_ROWS, BLOCK_R=max(1, min(SORT_STEP_ROWS, 1024 // n_p2)),
                BLOCK_J=SORT_BLOCKS)
    _dkv_count_kernel[(ng, B * H)](indices, base, T, NB, ng, **meta, num_warps=4)
    _dkv_scan_kernel[(ceil_div(NB, 128), B * H)](base, tot, NB, ng, BLOCK_G=16, BLOCK_J=128, num_warps=4)
    _dkv_place_kernel[(ng + 1, B * H)](indices, base, tot, entries, item_key, item_lo, item_hi, item_slot, key_items,
                                       key_first_slot, T, NB, ng, chunk, n_work, **meta, BLOCK_K=256, num_warps=4)
    return (entries, item_key, item_lo, item_hi, item_slot, key_items, key_first_slot,
            max(1, 2 * total // chunk))


def selection_fwd(q, k, v, indices, sel_block, scale, o, lse, walk=None):
    """Launch the forward into preallocated o [B, T, HQ, D] and lse [B, T, HQ] fp32 (contiguous
    inputs); the tests hand in NaN-filled buffers to catch unwritten elements. `walk`: a `tile_walk`
    of these inputs, built here when not given."""
    T, S = q.shape[1], k.shape[1]
    cfg, grid = _launch_cfg(q, k, indices, sel_block)
    uni, bits, cnt, ul = _walk_args(cfg, walk if walk is not None else tile_walk(q, k, indices, sel_block),
                                    indices)
    args = (q, k, v, o, lse, indices, uni, bits, cnt, T, S, sel_block, ul, scale * LOG2E)
    launch = fitting(_sel_fwd_kernel, args, [dict(cfg, **w) for w in WALK_LAUNCHES], q.device.index or 0,
                     key=(q.dtype, *cfg.values()))
    _sel_fwd_kernel[grid](*args, **launch)


def selection_dq(do, q, k, v, o, lse, indices, sel_block, scale, dq, delta, walk=None):
    """dQ into preallocated dq, and delta = rowsum(dO * O) [B, T, HQ] fp32 (dK/dV's input) into delta;
    `walk` as for `selection_fwd`."""
    T, S = q.shape[1], k.shape[1]
    cfg, grid = _launch_cfg(q, k, indices, sel_block)
    uni, bits, cnt, ul = _walk_args(cfg, walk if walk is not None else tile_walk(q, k, indices, sel_block),
                                    indices)
    args = (q, k, v, o, do, lse, delta, dq, indices, uni, bits, cnt, T, S, sel_block, ul, scale, scale * LOG2E)
    launch = fitting(_sel_dq_kernel, args, [dict(cfg, **w) for w in WALK_LAUNCHES], q.device.index or 0,
                     key=(q.dtype, *cfg.values()))
    _sel_dq_kernel[grid](*args, **launch)


def selection_dkv(do, q, k, v, lse, delta, indices, sel_block, scale, dk, dv):
    """dK, dV into preallocated dk, dv: reverse index, work items, then the two kernels."""
    B, T, HQ, D = q.shape
    S, H, Hs = k.shape[1], k.shape[2], indices.shape[2]
    (entries, item_key, item_lo, item_hi, item_slot, key_items, key_first_slot,
     n_slots) = _dkv_items(indices, H, S, sel_block)
    block_s, block_d = max(16, _pow2(sel_block)), max(16, _pow2(D))
    prec, upcast = dot_precision(q.dtype)
    part_dk = torch.empty(n_slots, block_s, block_d, dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    args = (q, k, v, do, lse, delta, dk, dv, part_dk, part_dv, entries, item_key, item_lo, item_hi, item_slot,
            T, S, sel_block, scale, scale * LOG2E)
    keys_major = D <= KEYS_MAJOR_MAX_D
    meta = dict(HQ=HQ, H=H, HS=Hs, D=D, BLOCK_S=block_s, BLOCK_D=block_d, KEYS_MAJOR=keys_major, PREC=prec,
                UPCAST=upcast)
    candidates = []
    for rows, warps, stages in DKV_LAUNCHES[keys_major]:
        block_e = max(1, rows // (HQ // Hs))
        candidates.append(dict(meta, BLOCK_E=block_e, BLOCK_R=_pow2(block_e * (HQ // Hs)), num_warps=warps,
                               num_stages=stages))
    launch = fitting(_sel_dkv_kernel, args, candidates, q.device.index or 0, key=(q.dtype, *meta.values()))
    _sel_dkv_kernel[(item_key.numel(),)](*args, **launch)
    _sel_dkv_reduce_kernel[(key_items.numel(),)](part_dk, part_dv, dk, dv, key_items, key_first_slot, S, sel_block,
                                                 H=H, D=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)


def selection_bwd(do, q, k, v, o, lse, indices, sel_block, scale, dq, dk, dv, walk=None):
    """Launch the backward into preallocated dq, dk, dv (contiguous inputs); `walk` as for `selection_fwd`."""
    delta = lse.new_empty(lse.shape)
    selection_dq(do, q, k, v, o, lse, indices, sel_block, scale, dq, delta, walk)
    selection_dkv(do, q, k, v, lse, delta, indices, sel_block, scale, dk, dv)


@torch.library.custom_op("nsa::selection_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, sel_block: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """o, lse and the tile walk (uni, bits, cnt: `tile_walk`), which the backward reuses."""
    q, k, v, indices = (x.contiguous() for x in (q, k, v, indices))
    o = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    walk = tile_walk(q, k, indices, sel_block)
    selection_fwd(q, k, v, indices, sel_block, scale, o, lse, walk)
    return o, lse, *walk


@_fwd_op.register_fake
def _(q, k, v, indices, sel_block, scale):
    # Contiguous, like the real op's outputs (it makes its inputs contiguous first).
    walk = (q.new_empty(shape, dtype=dtype) for shape, dtype in _walk_shapes(q, k, indices, sel_block))
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), *walk


@torch.library.custom_op("nsa::selection_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, indices: torch.Tensor, uni: torch.Tensor, bits: torch.Tensor, cnt: torch.Tensor,
            sel_block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v, o, lse, indices, uni, bits, cnt = (x.contiguous() for x in (do, q, k, v, o, lse, indices, uni,
                                                                             bits, cnt))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    selection_bwd(do, q, k, v, o, lse, indices, sel_block, scale, dq, dk, dv, (uni, bits, cnt))
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, indices, uni, bits, cnt, sel_block, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, sel_block, scale = inputs
    o, lse, uni, bits, cnt = output
    # lse is the backward's statistic, not a result (`selection_attention` drops it): no gradient flows
    # through it, and a loss that uses it alone fails loudly instead of getting a silent zero. The walk
    # is integer bookkeeping.
    ctx.mark_non_differentiable(lse, uni, bits, cnt)
    ctx.save_for_backward(q, k, v, indices, o, lse, uni, bits, cnt)
    ctx.sel_block, ctx.scale = sel_block, scale


def _backward(ctx, do, *_):
    q, k, v, indices, o, lse, uni, bits, cnt = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, indices, uni, bits, cnt, ctx.sel_block, ctx.scale)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, indices, sel_block):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, HQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must both be [B, S, H, D] with q's B={B} and D={D}; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    H = k.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({H})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32 (as select_blocks returns), got {indices.dtype}")
    if indices.dim() != 4 or indices.shape[:2] != (B, T) or indices.shape[2] not in (H, HQ):
        raise ValueError(f"indices must be [B, T, Hs, n] with B={B}, T={T}, Hs in ({H}, {HQ}); "
                         f"got {tuple(indices.shape)}")
    if len({q.device, k.device, v.device, indices.device}) != 1:
        raise ValueError("q, k, v and indices must be on one device")
    if not isinstance(sel_block, int) or sel_block < 1:
        raise ValueError(f"sel_block must be a positive int, got {sel_block!r}")


def selection_attention(q, k, v, indices, p, block_gate=None):
    """Triton twin of `reference.selection_attention` (causal, no block gate).

    q [B, T, HQ, D]; k, v [B, S, H, D]; indices [B, T, Hs, n] int32, each row's valid blocks
    distinct and ascending, -1 padding. Returns o [B, T, HQ, D] in q's dtype; differentiable in q,
    k, v.
    """
    if not p.causal:
        raise NotImplementedError("the Triton selection kernel is causal only: use the torch or flex backend")
    if block_gate is not None:
        raise NotImplementedError("the Triton selection kernel has no block gate (diff_topk): use the torch backend")
    sel_block = p.sel_block
    _check_inputs(q, k, v, indices, sel_block)
    scale = float(p.scale_for(q.shape[-1]))
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _fwd_op(q, k, v, indices, sel_block, scale)[0]
