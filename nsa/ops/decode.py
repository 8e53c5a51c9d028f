"""Triton decode step: one query per sequence against the preallocated caches of `nsa.cache`.

`decode_attention` has the signature of `nsa.ops.reference.decode_attention`. A step is four
kernels, split flash-decoding style so that batch 1 fills the GPU as well as batch 16 does. A "pair" is
one (sequence b, selection head hs): with GQA-shared selection (the default) hs is a kv head and its G
query heads are one tile; with per-head selection hs is a query head (a tile of one).

1. `_partials_kernel`, grid (pairs, N_GZ + compressed chunks + window chunks in use (at most NC_SPLIT +
   W_SPLIT)). After the first N_GZ, the programs each run the compressed attention of their pair over one chunk
   of the compressed rows (memory rows first, then the blocks complete at t), keeping an online softmax
   (m, l, acc) in fp32 that they write as a partial, and write the raw scores of their compressed
   blocks (fp32, per query head) to a scratch row. The next each attend one chunk of the window
   (t - w, t] (the window cache may be a ring: position p in slot p % W) and write a partial the same
   way. The compressed keys are read once. The first N_GZ programs of the first pairs compute the gate
   logits' partials: one slice of the layer input's features of w_gate x, for 16 sequences and one
   selection head's query heads at a time (a tensor-core tile), so each weight is read once a step,
   whatever the batch, beside the attention programs rather than after them in the last kernel.
2. `_importance_kernel`, grid (pairs, chunks): merges the compressed (m, l) partials into the
   log-sum-exp and, for a chunk of selection blocks, turns the scores of the compressed blocks that
   overlap each into probabilities summed over the pair's query heads and maps them onto the block
   by overlap (Eq. 9, 0-based): one fp32 importance per selection block. (A compressed block that
   straddles two selection blocks is exponentiated for both: l / l' more exponentials, so that the
   select kernel, which every selection program of a pair runs, loads one row instead of gathering.)
3. `_select_kernel`, grid (pairs, S_SPLIT): loads the importances, forces the initial and local
   blocks (+inf) and drops invalid ones (j > t // l'), takes
   the top-n of int64 keys (ties to the lower index) with one bitonic top-k network (`tl.topk`),
   then attends to its share of the picked blocks (tokens <= t) and writes a partial.
4. `_combine_kernel`, grid (B * HQ,): per query head, sums its gate-logit partials, adds the bias
   and takes the sigmoid (fp32), merges each branch's partials (one load of all of them) and writes
   g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

The softmax runs in base 2 (scores times log2(e), exp2), the partials and scores too; only the output
leaves the step. Grid sizes and chunk lengths depend only on static shapes (batch, heads, cache
capacities), never on t, which every program reads from the device and masks with: no host
synchronisation, so the step can be captured in a CUDA graph. Chunks past the current length write
empty partials (m = -1e30, l = 0). Any G works (the query tile is padded to a power of two >= 16).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from nsa.ops.common import ceil_div, num_compressed_blocks
from nsa.ops.utils import LOG2E, dot, dot_precision, num_sms, num_visible_blocks

# Allocator of the outputs and scratch; the tests swap in a poisoned one to catch elements the kernels
# forget to write, or read before writing.
_empty = torch.empty
MAX_SPLIT = 16  # most chunks per pair and branch (compressed, window)
GATE_CHUNK, GATE_K, GATE_B = 512, 64, 16  # a gate program: features, features a step, sequences
_NO_KEY = tl.constexpr(-1.0e30)  # the running max of a partial with no key: finite, so merging never makes inf - inf


@triton.jit
def _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of an online softmax in base 2: scores b_s [BG, BN] (masked keys at -inf), values
    b_v [BN, BD]; running max b_m, sum b_l, output b_acc."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, PREC, UPCAST)
    return b_m_new, b_l, b_acc


@triton.jit
def _attend_range(b_q, p_k, p_v, row_stride, lo, hi, slots, b_m, b_l, b_acc, qk_scale, p_sc, sc_g, sc_off, o_g, m_g,
                  o_d, m_d, RING: tl.constexpr, SCORES: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Online softmax of b_q over positions [lo, hi) of p_k, p_v. RING: position x is in row x % slots,
    and hi - lo <= slots. With SCORES, also store the scores of positions x >= sc_off at
    p_sc + g * sc_g + (x - sc_off)."""
    o_n = tl.arange(0, BLOCK_N)
    for i_n in range(lo, hi, BLOCK_N):
        o_x = i_n + o_n
        m_x = o_x < hi
        if RING:
            # One scalar modulo per tile; a tile's valid rows wrap at most once (hi - lo <= slots).
            o_row = i_n % slots + o_n
            o_row = tl.where(o_row >= slots, o_row - slots, o_row)
        else:
            o_row = o_x
        o_kv = o_row[:, None].to(tl.int64) * row_stride + o_d[None, :]
        m_kv = m_x[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_kv, mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_kv, mask=m_kv, other=0.0)
        b_s = dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale
        if SCORES:
            p_s = p_sc + o_g[:, None].to(tl.int64) * sc_g + (o_x - sc_off)[None, :]
            tl.store(p_s, b_s, mask=m_g[:, None] & (m_x & (o_x >= sc_off))[None, :])
        b_m, b_l, b_acc = _softmax_step(tl.where(m_x[None, :], b_s, float("-inf")), b_v, b_m, b_l, b_acc, PREC,
                                        UPCAST)
    return b_m, b_l, b_acc


@triton.jit
def _pair_heads(i_pair, p_tpos, sq_b, sq_h, HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """A pair's sequence b, kv head h, position t, its query-head rows (o_g, m_g), head dims (o_d, m_d)
    and the offsets o_q of its query rows in a [B, HQ, D] tensor of strides sq_b, sq_h."""
    b = (i_pair // HS).to(tl.int64)
    hq0 = (i_pair % HS) * GS  # first query head of this pair
    h = (hq0 // G).to(tl.int64)  # its kv head
    t = tl.load(p_tpos + b).to(tl.int32)
    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    o_q = b * sq_b + (hq0 + o_g)[:, None].to(tl.int64) * sq_h + o_d[None, :]
    return b, h, t, o_g, o_g < GS, o_d, o_d < D, o_q


@triton.jit
def _store_partial(p_pm, p_pl, p_pacc, i_pair, slot, b_m, b_l, b_acc, o_g, o_d, NPART: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial `slot` of a pair's query heads; layout [pair, head, slot] (and [.., D] for acc), so the
    combine kernel reads all slots of one head in one load."""
    o_row = (i_pair.to(tl.int64) * BLOCK_G + o_g) * NPART + slot
    tl.store(p_pm + o_row, b_m)
    tl.store(p_pl + o_row, b_l)
    tl.store(p_pacc + o_row[:, None] * BLOCK_D + o_d[None, :], b_acc)


@triton.jit
def _gate_partial(X, WG, GZ, B, i_b, hs, i_z, sx_b, swg, GS: tl.constexpr, HS: tl.constexpr, DIM: tl.constexpr,
                  N_GZ: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Slot i_z of the gate logits of sequences [i_b * BLOCK_B, +BLOCK_B) and the query heads hq of
    selection head hs: features [i_z * CHUNK, +CHUNK) of w_gate x for the rows 3 * hq + (cmp, slc, win),
    fp32, laid out [b, hs, slot, head of the pair * 4 + gate] (gate 3 unused)."""
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_gr = tl.arange(0, BLOCK_G * 4)
    m_gr = (o_gr // 4 < GS) & (o_gr % 4 < 3)
    p_w = WG + (hs * GS * 3 + (o_gr // 4) * 3 + o_gr % 4)[:, None].to(tl.int64) * swg
    p_x = X + o_b[:, None].to(tl.int64) * sx_b
    o_k = tl.arange(0, BLOCK_K)
    b_z = tl.zeros([BLOCK_B, BLOCK_G * 4], tl.float32)
    for k0 in range(i_z * CHUNK, i_z * CHUNK + CHUNK, BLOCK_K):
        m_k = k0 + o_k < DIM
        b_x = tl.load(p_x + (k0 + o_k)[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_w + (k0 + o_k)[None, :], mask=m_gr[:, None] & m_k[None, :], other=0.0)
        b_z += dot(b_x, tl.trans(b_w), PREC, UPCAST)
    o_z = ((o_b.to(tl.int64) * HS + hs) * N_GZ + i_z)[:, None] * (BLOCK_G * 4) + o_gr[None, :]
    tl.store(GZ + o_z, b_z, mask=m_b[:, None])


@triton.jit
def _attention_chunk(Q, QR, CK, CV, KW, VW, TPOS, PM, PL, PACC, SC, i_pair, i_c,
                     sq_b, sq_h, sck_b, sck_r, sck_h, skw_b, skw_s, skw_h, qk_scale, w_slots, nc_chunk, w_chunk,
                     nc_used, HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     SC_ROW: tl.constexpr, NUM_MEM: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr,
                     WINDOW: tl.constexpr, NC_SPLIT: tl.constexpr, NPART: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Chunk i_c of pair i_pair: compressed rows (i_c < nc_used) or window positions, as one partial."""
    b, h, t, o_g, m_g, o_d, m_d, o_q = _pair_heads(i_pair, TPOS, sq_b, sq_h, HS, GS, G, D, BLOCK_G, BLOCK_D)
    m_q = m_g[:, None] & m_d[None, :]
    b_m = tl.full([BLOCK_G], _NO_KEY, tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    p_sc = SC + i_pair.to(tl.int64) * (BLOCK_G * SC_ROW)
    slot = i_c
    if i_c < nc_used:
        # Compressed rows [i_c * nc_chunk, ...) of the memory rows + the blocks complete at t.
        b_q = tl.load(Q + o_q, mask=m_q, other=0.0)
        lo = i_c * nc_chunk
        hi = tl.minimum(lo + nc_chunk, NUM_MEM + num_visible_blocks(t, L_CMP, STRIDE))
        b_m, b_l, b_acc = _attend_range(b_q, CK + b * sck_b + h * sck_h, CV + b * sck_b + h * sck_h, sck_r, lo, hi,
                                        0, b_m, b_l, b_acc, qk_scale, p_sc, SC_ROW, NUM_MEM, o_g, m_g, o_d, m_d,
                                        RING=False, SCORES=True, BLOCK_N=BLOCK_N, PREC=PREC, UPCAST=UPCAST)
    else:
        # Window positions (t - WINDOW, t], chunk i_c - nc_used of them, in a ring of w_slots rows.
        slot = NC_SPLIT + i_c - nc_used
        b_q = tl.load(QR + o_q, mask=m_q, other=0.0)
        lo = tl.maximum(t - WINDOW + 1, 0) + (i_c - nc_used) * w_chunk
        hi = tl.minimum(lo + w_chunk, t + 1)
        b_m, b_l, b_acc = _attend_range(b_q, KW + b * skw_b + h * skw_h, VW + b * skw_b + h * skw_h, skw_s, lo, hi,
                                        w_slots, b_m, b_l, b_acc, qk_scale, p_sc, SC_ROW, 0, o_g, m_g, o_d, m_d,
                                        RING=True, SCORES=False, BLOCK_N=BLOCK_N, PREC=PREC, UPCAST=UPCAST)
    _store_partial(PM, PL, PACC, i_pair, slot, b_m, b_l, b_acc, o_g, o_d, NPART, BLOCK_G, BLOCK_D)


# The ring's size, the chunks in use and the batch follow the cache: unspecialised, so a new length
# compiles nothing (Triton would specialise a value of 1 or a multiple of 16).
@triton.jit(do_not_specialize=["w_slots", "nc_used", "B"])
def _partials_kernel(
    Q, QR, CK, CV, KW, VW, TPOS, PM, PL, PACC, SC, X, WG, GZ,
    sq_b, sq_h, sck_b, sck_r, sck_h, skw_b, skw_s, skw_h, qk_scale, w_slots, nc_chunk, w_chunk, nc_used,
    B, sx_b, swg,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SC_ROW: tl.constexpr,
    NUM_MEM: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    NC_SPLIT: tl.constexpr, NPART: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, DIM: tl.constexpr, N_GZ: tl.constexpr, GATE_B: tl.constexpr,
    GATE_CHUNK: tl.constexpr, GATE_K: tl.constexpr, GPREC: tl.constexpr, GUPCAST: tl.constexpr,
):
    """Programs i_z >= N_GZ of a pair: attention chunk i_z - N_GZ each. The first N_GZ: gate-logit partial
    i_z of selection head i_pair % HS and sequence chunk i_pair // HS, where that chunk holds sequences
    (the gate needs Hs * ceil(B / GATE_B) of the pairs' rows); first in the grid so that they start with the
    attention programs instead of running after them as the kernel's tail. Here rather than in the
    importance kernel: a kernel's registers and shared memory are those of its largest path, and the
    gate's dot (154 registers, 10 KB compiled for sm_90) cut the importance programs' occupancy, whose
    own path needs 96 registers; this kernel's attention path already needs more than the gate's."""
    i_pair = tl.program_id(0)
    i_z = tl.program_id(1)
    if i_z >= N_GZ:
        _attention_chunk(Q, QR, CK, CV, KW, VW, TPOS, PM, PL, PACC, SC, i_pair, i_z - N_GZ, sq_b, sq_h, sck_b, sck_r,
                         sck_h, skw_b, skw_s, skw_h, qk_scale, w_slots, nc_chunk, w_chunk, nc_used, HS, GS, G, D,
                         SC_ROW, NUM_MEM, L_CMP, STRIDE, WINDOW, NC_SPLIT, NPART, BLOCK_G, BLOCK_D, BLOCK_N, PREC,
                         UPCAST)
    elif (i_pair // HS) * GATE_B < B:
        _gate_partial(X, WG, GZ, B, i_pair // HS, i_pair % HS, i_z, sx_b, swg, GS, HS, DIM, N_GZ,
                      BLOCK_G, GATE_B, GATE_CHUNK, GATE_K, GPREC, GUPCAST)


@triton.jit(do_not_specialize=["nc_used"])
def _importance_kernel(
    TPOS, PM, PL, SC, PS, nc_used,
    HS: tl.constexpr, GS: tl.constexpr, SC_ROW: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr,
    SEL: tl.constexpr, NS_PAD: tl.constexpr, R_OVL: tl.constexpr, J_CHUNK: tl.constexpr,
    NC_PAD: tl.constexpr, NPART: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program (i_pair, i_c): the importances of chunk i_c of pair i_pair's selection blocks."""
    _block_importance(TPOS, PM, PL, SC, PS, nc_used, tl.program_id(0), tl.program_id(1), HS, GS, SC_ROW, L_CMP,
                      STRIDE, SEL, NS_PAD, R_OVL, J_CHUNK, NC_PAD, NPART, BLOCK_G, BLOCK_J)


@triton.jit
def _block_importance(TPOS, PM, PL, SC, PS, nc_used, i_pair, i_c, HS: tl.constexpr, GS: tl.constexpr,
                      SC_ROW: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
                      NS_PAD: tl.constexpr, R_OVL: tl.constexpr, J_CHUNK: tl.constexpr, NC_PAD: tl.constexpr,
                      NPART: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    """imp[j] = sum over the compressed blocks i overlapping selection block j of c(i, j) * p[i],
    p[i] = sum over the pair's query heads g of 2^(s[g, i] - lse[g]) (base-2 scores and lse), for the
    selection blocks [i_c * J_CHUNK, (i_c + 1) * J_CHUNK); lse from the compressed partials. Blocks
    past t // l' get 0 (the select kernel drops them)."""
    t = tl.load(TPOS + i_pair // HS).to(tl.int32)
    o_g = tl.arange(0, BLOCK_G)
    o_c = tl.arange(0, NC_PAD)
    m_g = o_g < GS
    o_row = (i_pair.to(tl.int64) * BLOCK_G + o_g)[:, None] * NPART + o_c[None, :]
    m_c = (o_c < nc_used)[None, :]
    b_mc = tl.load(PM + o_row, mask=m_c, other=_NO_KEY)
    b_lc = tl.load(PL + o_row, mask=m_c, other=0.0)
    b_m = tl.max(b_mc, axis=1)
    b_l = tl.sum(b_lc * tl.exp2(b_mc - b_m[:, None]), axis=1)
    m_has = m_g & (b_l > 0)
    b_lse = b_m + tl.log2(tl.where(m_has, b_l, 1.0))
    n_vis = num_visible_blocks(t, L_CMP, STRIDE)
    p_sc = SC + i_pair.to(tl.int64) * (BLOCK_G * SC_ROW)
    PER_CMP: tl.constexpr = L_CMP // STRIDE  # stride chunks per compressed block
    PER_SEL: tl.constexpr = SEL // STRIDE  # stride chunks per selection block
    o_jj = tl.arange(0, BLOCK_J)
    o_r = tl.arange(0, R_OVL)
    for j0 in range(i_c * J_CHUNK, (i_c + 1) * J_CHUNK, BLOCK_J):
        o_j = j0 + o_jj
        o_i = o_j[:, None] * PER_SEL - PER_CMP + 1 + o_r[None, :]  # [BLOCK_J, R_OVL]: the blocks overlapping j
        b_w = tl.maximum(tl.minimum(o_i + PER_CMP, (o_j[:, None] + 1) * PER_SEL)
                         - tl.maximum(o_i, o_j[:, None] * PER_SEL), 0).to(tl.float32)
        m_i = (o_i >= 0) & (o_i < n_vis) & (o_r[None, :] < PER_SEL + PER_CMP - 1)
        # [blocks j, overlapping i, heads], heads innermost: heads outermost (a head's scores contiguous
        # along the lanes) measured 2-4x slower on an H200.
        m_s = m_i[:, :, None] & m_has[None, None, :]
        b_s = tl.load(p_sc + o_g[None, None, :] * SC_ROW + o_i[:, :, None], mask=m_s, other=float("-inf"))
        b_p = tl.sum(tl.where(m_s, tl.exp2(b_s - b_lse[None, None, :]), 0.0), axis=2)
        tl.store(PS + i_pair.to(tl.int64) * NS_PAD + o_j, tl.sum(b_w * b_p, axis=1), mask=o_j < NS_PAD)


@triton.jit
def _select_kernel(
    QR, KS, VS, TPOS, IDX, PM, PL, PACC, PS,
    sq_b, sq_h, sks_b, sks_s, sks_h, qk_scale,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    SEL: tl.constexpr, NSEL: tl.constexpr, NSEL_PAD: tl.constexpr, NUM_INIT: tl.constexpr,
    NUM_LOCAL: tl.constexpr, NS_PAD: tl.constexpr, S_SPLIT: tl.constexpr,
    SLOT0: tl.constexpr, NPART: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Top-n of the pair (every program of the pair computes it; program 0 writes the indices), then
    program i_s attends to the picks of rank i_s, i_s + S_SPLIT, ... and writes partial SLOT0 + i_s."""
    i_pair = tl.program_id(0)
    i_s = tl.program_id(1)
    b, h, t, o_g, m_g, o_d, m_d, o_q = _pair_heads(i_pair, TPOS, sq_b, sq_h, HS, GS, G, D, BLOCK_G, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)

    # ---- importance of the selection blocks, forced and invalid ones -------------------------------
    o_j = tl.arange(0, NS_PAD)
    cur = t // SEL
    m_valid = o_j <= cur
    b_imp = tl.load(PS + i_pair.to(tl.int64) * NS_PAD + o_j, mask=m_valid, other=0.0)
    m_forced = m_valid & ((o_j < NUM_INIT) | ((cur - o_j >= 0) & (cur - o_j < NUM_LOCAL)))
    b_imp = tl.where(m_forced, float("inf"), b_imp)

    # ---- top-n of int64 keys (importance bits, then the lower index), by one bitonic top-k network -
    # b_imp >= 0 or +inf, so its fp32 bits order like the values; invalid blocks get key -1. The keys
    # are distinct, so the picks are those of n arg-max passes, in the same order (n sequential
    # block-wide reductions took longer than the network's log-depth steps).
    b_key = (b_imp.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (NS_PAD - 1 - o_j).to(tl.int64)
    b_key = tl.where(m_valid, b_key, -1)
    o_s = tl.arange(0, NSEL_PAD)
    b_top = tl.topk(b_key, NSEL_PAD)
    b_picks = tl.where((b_top >= 0) & (o_s < NSEL), NS_PAD - 1 - (b_top & 0xFFFFFFFF).to(tl.int32), -1)
    if i_s == 0:
        tl.store(IDX + i_pair.to(tl.int64) * NSEL + o_s, b_picks, mask=o_s < NSEL)

    # ---- selected attention over this program's picks ----------------------------------------------
    b_q = tl.load(QR + o_q, mask=m_g[:, None] & m_d[None, :], other=0.0)
    p_k = KS + b * sks_b + h * sks_h
    p_v = VS + b * sks_b + h * sks_h
    b_m = tl.full([BLOCK_G], _NO_KEY, tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # One flat loop with a static trip count over this program's tiles (rank i_s + S_SPLIT * u,
    # BLOCK_N positions at a time): the addresses do not depend on earlier loads, so Triton pipelines it.
    TILES: tl.constexpr = (SEL + BLOCK_N - 1) // BLOCK_N  # tiles per selection block
    MY_RANKS: tl.constexpr = (NSEL + S_SPLIT - 1) // S_SPLIT
    for i_tile in range(MY_RANKS * TILES):
        rank = i_s + (i_tile // TILES) * S_SPLIT
        blk = tl.where(rank < NSEL, tl.sum(tl.where(o_s == rank, b_picks, 0), axis=0), -1)  # -1: no pick
        o_x = (i_tile % TILES) * BLOCK_N + o_n
        o_tok = blk * SEL + o_x
        m_tok = (o_x < SEL) & (o_tok <= t) & (o_tok >= 0)  # a missing pick (-1) gives o_tok < 0
        o_kv = o_tok[:, None].to(tl.int64) * sks_s + o_d[None, :]
        m_kv = m_tok[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_kv, mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_kv, mask=m_kv, other=0.0)
        b_s = tl.where(m_tok[None, :], dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale, float("-inf"))
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC, UPCAST)
    _store_partial(PM, PL, PACC, i_pair, SLOT0 + i_s, b_m, b_l, b_acc, o_g, o_d, NPART, BLOCK_G, BLOCK_D)


@triton.jit
def _branch(b_mc, b_lc, b_accc, m_branch):
    """Merge the partials (rows of b_mc, b_lc, b_accc) where m_branch into the normalised branch output."""
    b_mc = tl.where(m_branch, b_mc, _NO_KEY)
    b_a = tl.where(m_branch, tl.exp2(b_mc - tl.max(b_mc, axis=0)), 0.0)
    b_l = tl.sum(b_a * b_lc, axis=0)
    return tl.sum(b_a[:, None] * b_accc, axis=0) / tl.where(b_l > 0, b_l, 1.0)


@triton.jit(do_not_specialize=["nc_used", "w_used"])
def _combine_kernel(
    BG, O, PM, PL, PACC, GZ, so_b, so_h, nc_used, w_used,
    HQ: tl.constexpr, HS: tl.constexpr, GS: tl.constexpr, D: tl.constexpr,
    NC_SPLIT: tl.constexpr, W_SPLIT: tl.constexpr, NPART: tl.constexpr, NPART_PAD: tl.constexpr,
    N_GZ: tl.constexpr, GZ_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query head: its gates (the partial logits summed in slot order, plus bias, sigmoid), then
    merge each branch's partials (one load of all the slots in use) and gate them."""
    i_bh = tl.program_id(0)
    b = (i_bh // HQ).to(tl.int64)
    hq = i_bh % HQ
    pair = b * HS + hq // GS
    o_r = tl.arange(0, 4)
    m_r = o_r < 3
    o_z = tl.arange(0, GZ_PAD)
    p_z = GZ + (pair * N_GZ + o_z)[:, None] * (BLOCK_G * 4) + (hq % GS) * 4 + o_r[None, :]
    b_z = tl.sum(tl.load(p_z, mask=(o_z < N_GZ)[:, None] & m_r[None, :], other=0.0), axis=0)
    b_g = tl.sigmoid(b_z + tl.load(BG + hq * 3 + o_r, mask=m_r, other=0.0).to(tl.float32))
    o_c = tl.arange(0, NPART_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_cmp = o_c < nc_used
    m_win = (o_c >= NC_SPLIT) & (o_c < NC_SPLIT + w_used)
    m_slc = (o_c >= NC_SPLIT + W_SPLIT) & (o_c < NPART)
    m_c = m_cmp | m_win | m_slc  # slots not in use were never written
    o_row = (pair * BLOCK_G + hq % GS) * NPART + o_c
    b_mc = tl.load(PM + o_row, mask=m_c, other=_NO_KEY)
    b_lc = tl.load(PL + o_row, mask=m_c, other=0.0)
    b_accc = tl.load(PACC + o_row[:, None] * BLOCK_D + o_d[None, :], mask=m_c[:, None], other=0.0)
    b_o = tl.sum(tl.where(o_r == 0, b_g, 0.0), axis=0) * _branch(b_mc, b_lc, b_accc, m_cmp)
    b_o += tl.sum(tl.where(o_r == 1, b_g, 0.0), axis=0) * _branch(b_mc, b_lc, b_accc, m_slc)
    b_o += tl.sum(tl.where(o_r == 2, b_g, 0.0), axis=0) * _branch(b_mc, b_lc, b_accc, m_win)
    tl.store(O + b * so_b + hq.to(tl.int64) * so_h + o_d, b_o.to(O.dtype.element_ty), mask=o_d < D)


def _plan(pairs, nc_rows, w_len, num_selected, block_n, sms):
    """Programs per pair: (compressed chunks, window chunks, selection programs), for nc_rows compressed
    rows and a window of w_len positions. About 4 programs per SM for the compressed keys (the most
    bytes), 2 for the window, chunks of whole tiles; at most MAX_SPLIT chunks per pair and branch, so
    the merges stay one load. The selection programs each redo the pair's top-n, so they fill one wave
    at most. (The tests swap this, and `_chunk`, for forced splits.)"""
    def split(length, target):
        return ceil_div(length, _chunk(length, min(ceil_div(target, pairs), ceil_div(length, block_n)), block_n))

    return (split(nc_rows, min(4 * sms, MAX_SPLIT * pairs)), split(w_len, min(2 * sms, MAX_SPLIT * pairs)),
            max(1, min(num_selected, sms // pairs)))


def _chunk(length, chunks, granule):
    """Length of each of `chunks` chunks covering `length` items, rounded up to a multiple of granule."""
    return ceil_div(ceil_div(max(length, 1), chunks), granule) * granule


def _decode_launch(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t, block, stride, sel_block,
                   num_mem, num_selected, num_initial, num_local, window, shared, scale):
    # No recompilation for every new cache length: what the kernels take as compile-time constants
    # depends on the heads, head dim, NSA hyperparameters, the device and a capacity bucket S_b (the
    # cache's capacity rounded up to a power of two times l', at least 16 selection blocks), never on
    # the capacity itself. The compile-time sizes (selection-block vector, scratch rows, chunk counts)
    # are those of S_b, so a capacity of S_b itself gets the launches sized for it exactly (bucketing
    # a constant to another value, e.g. padding the scratch rows, slowed the importance kernel by 70%
    # on an H200); the chunk lengths, the chunks in use and the window ring's size are runtime
    # arguments. Runtime integers Triton would specialise (== 1, divisible by 16) are either always of
    # one class (chunk lengths: whole tiles; the caches' strides when H * D is a multiple of 16) or
    # marked do_not_specialize.
    B, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    Hs = H if shared else HQ
    GS = HQ // Hs
    S, W = k_slc.shape[1], k_win.shape[1]
    ns_pad = max(16, triton.next_power_of_2(ceil_div(S, sel_block)))
    s_b = ns_pad * sel_block
    sc_row = max(num_compressed_blocks(s_b, block, stride), 1)  # compressed blocks that fit in S_b
    q, q_rot, x, w_gate = q.contiguous(), q_rot.contiguous(), x.contiguous(), w_gate.contiguous()
    if x.dtype != w_gate.dtype:  # the gate's dot takes one dtype
        x, w_gate = x.float(), w_gate.float()
    BLOCK_G = max(16, triton.next_power_of_2(GS))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    block_n = 64 if BLOCK_G * BLOCK_D <= 64 * 128 else 32
    num_warps = 4 if BLOCK_G * BLOCK_D <= 16 * 128 else 8
    pairs = B * Hs
    nc_split, w_split, s_split = _plan(pairs, num_mem + sc_row, min(window, s_b), num_selected, block_n,
                                       num_sms(q.device.index or 0))
    npart = nc_split + w_split + s_split
    # Launched: the chunks that hold rows of this cache; the partials' layout has room for NC_SPLIT
    # and W_SPLIT of them, and the merges read the slots in use.
    nc_rows, w_len = ck.shape[1], min(window, S)
    nc_chunk, w_chunk = _chunk(nc_rows, nc_split, block_n), _chunk(w_len, w_split, block_n)
    nc_used, w_used = ceil_div(max(nc_rows, 1), nc_chunk), ceil_div(max(w_len, 1), w_chunk)
    block_j = max(16, min(64, ns_pad // nc_split))
    j_chunk = _chunk(ns_pad, nc_split, block_j)
    f32 = dict(dtype=torch.float32, device=q.device)
    pm = _empty(pairs * BLOCK_G * npart, **f32)
    pl = _empty(pairs * BLOCK_G * npart, **f32)
    pacc = _empty(pairs * BLOCK_G * npart * BLOCK_D, **f32)
    sc = _empty(pairs * BLOCK_G * sc_row, **f32)  # base-2 compressed scores per query head
    dim = x.shape[1]
    n_gz = ceil_div(dim, GATE_CHUNK)  # gate-logit partials per pair
    gz = _empty(pairs * n_gz * BLOCK_G * 4, **f32)
    ps = _empty(pairs * ns_pad, **f32)  # importance of each selection block of a pair
    o = _empty(q.shape, dtype=q.dtype, device=q.device)
    idx = _empty((B, Hs, num_selected), dtype=torch.int32, device=q.device)
    prec, upcast = dot_precision(q.dtype)
    gprec, gupcast = dot_precision(x.dtype)
    qk_scale = float(scale) * LOG2E
    common = dict(HS=Hs, GS=GS, NPART=npart, BLOCK_G=BLOCK_G)
    attn = dict(G=G, D=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n, PREC=prec, UPCAST=upcast, num_warps=num_warps)
    cmp = dict(SC_ROW=sc_row, L_CMP=block, STRIDE=stride)
    _partials_kernel[(pairs, nc_used + w_used + n_gz)](
        q, q_rot, ck, cv, k_win, v_win, t, pm, pl, pacc, sc, x, w_gate, gz,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2),
        k_win.stride(0), k_win.stride(1), k_win.stride(2), qk_scale, W, nc_chunk,
        w_chunk, nc_used, B, x.stride(0), w_gate.stride(0), NUM_MEM=num_mem, WINDOW=window, NC_SPLIT=nc_split,
        DIM=dim, N_GZ=n_gz, GATE_B=GATE_B, GATE_CHUNK=GATE_CHUNK, GATE_K=GATE_K, GPREC=gprec, GUPCAST=gupcast,
        **common, **attn, **cmp)
    per_cmp, per_sel = block // stride, sel_block // stride
    _importance_kernel[(pairs, ceil_div(ns_pad, j_chunk))](
        t, pm, pl, sc, ps, nc_used, SEL=sel_block, NS_PAD=ns_pad,
        R_OVL=triton.next_power_of_2(per_sel + per_cmp - 1), J_CHUNK=j_chunk,
        NC_PAD=triton.next_power_of_2(nc_split), BLOCK_J=block_j, **common, **cmp, num_warps=4)
    _select_kernel[(pairs, s_split)](
        q_rot, k_slc, v_slc, t, idx, pm, pl, pacc, ps,
        q.stride(0), q.stride(1), k_slc.stride(0), k_slc.stride(1), k_slc.stride(2), qk_scale,
        SEL=sel_block, NSEL=num_selected, NSEL_PAD=triton.next_power_of_2(num_selected), NUM_INIT=num_initial,
        NUM_LOCAL=num_local, NS_PAD=ns_pad, S_SPLIT=s_split,
        SLOT0=nc_split + w_split, **common, **attn)
    _combine_kernel[(B * HQ,)](
        b_gate, o, pm, pl, pacc, gz, o.stride(0), o.stride(1), nc_used, w_used, HQ=HQ, D=D, NC_SPLIT=nc_split,
        W_SPLIT=w_split, NPART_PAD=triton.next_power_of_2(npart), N_GZ=n_gz,
        GZ_PAD=triton.next_power_of_2(n_gz), BLOCK_D=BLOCK_D, **common, num_warps=4)
    return o, idx


@torch.library.custom_op("nsa::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, q_rot: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor,
               b_gate: torch.Tensor, t: torch.Tensor, block: int, stride: int, sel_block: int, num_mem: int,
               num_selected: int, num_initial: int, num_local: int, window: int, shared: bool,
               scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # A custom op, so torch.compile calls it as one opaque step instead of tracing the launches (which
    # would copy the scratch buffers the kernels write into). Its schema takes NSAParams' fields.
    return _decode_launch(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t, block, stride,
                          sel_block, num_mem, num_selected, num_initial, num_local, window, shared, scale)


@_decode_op.register_fake
def _(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t, block, stride, sel_block, num_mem,
      num_selected, num_initial, num_local, window, shared, scale):
    Hs = ck.shape[2] if shared else q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[0], Hs, num_selected), dtype=torch.int32)


def decode_attention(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t, p, return_indices=False):
    """Triton twin of `nsa.ops.reference.decode_attention` (see there for shapes; p: `NSAParams`). The
    selected block indices it returns (return_indices) are in the order picked, not sorted."""
    for c in (ck, cv, k_slc, v_slc, k_win, v_win):
        if c.stride(-1) != 1:
            raise ValueError("decode caches must have a contiguous last dimension")
    if k_slc.stride() != v_slc.stride() or k_win.stride() != v_win.stride() or ck.stride() != cv.stride():
        raise ValueError("decode caches: keys and values must share strides")
    if q.shape[1] % ck.shape[2]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {ck.shape[2]}")
    if w_gate.shape != (3 * q.shape[1], x.shape[1]) or b_gate.shape != (3 * q.shape[1],):
        raise ValueError(f"gate projection {tuple(w_gate.shape)} / {tuple(b_gate.shape)} does not map x "
                         f"{tuple(x.shape)} to 3 gates for each of {q.shape[1]} query heads")
    o, idx = _decode_op(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t, p.compress_block,
                        p.compress_stride, p.sel_block, p.num_mem, p.num_selected, p.num_initial, p.num_local, p.window,
                        p.shared_selection, float(p.scale_for(q.shape[-1])))
    return (o, idx) if return_indices else o
