"""Selected-block attention (NSA's selection branch) in Triton: forward, dQ, and atomic-free dK/dV.

Same semantics as `nsa.ops.reference.selection_attention`: query t of head hq attends over the keys
s <= t of the selection blocks listed in indices[b, t, hs, :], where hs = hq // (HQ // Hs) (Hs = H:
one block set per kv head, shared by its G query heads; Hs = HQ: one per query head).

Kernel layout (docs/KERNELS_SELECTION.md has the numbers behind it):

* Forward and dQ: one program owns a tile of BLOCK_M query rows, a row being one (token, query head)
  of a single kv head: TT consecutive tokens x G heads, TT = BLOCK_M // G (TT = 1 once G >= 16, which
  is the paper's layout). When every row of the tile shares one list (TT = 1, Hs = H) the program
  loops over its n slots. Otherwise it walks the sorted *union* of its rows' lists, precomputed per
  tile with torch: each step loads one block once for the whole tile and masks the rows that did not
  pick it. Consecutive tokens pick mostly the same blocks (the forced initial and local ones, and
  correlated top-n), so small G fills the tensor-core tile without loading K/V more often than one
  token per tile would. Both walks are counted loops, which Triton software-pipelines.
* dK/dV: no atomics. A reverse index (for each kv block, the (token, index head) entries that picked
  it, in token order) is built on device with a stable sort, then one program per work item walks its
  entries and accumulates dK/dV of one block in fp32. Heavy blocks (block 0 is forced for every
  query) are split into several items whose fp32 partials a second kernel sums in a fixed order, so
  one hot block does not serialise the backward and results stay bit-for-bit reproducible.
"""

import math
import os

import torch
import triton
import triton.language as tl

from nsa.ops.common import ceil_div

LOG2E = 1.4426950408889634

# Smallest forward/dQ tile when G < 16: the tensor-core minimum of 16 rows, filled with several tokens.
MIN_ROWS = 16
# Query rows per inner step of the dK/dV kernel: 128 measured 1.6x faster than 64 (H100, 64k).
DKV_ROWS = 128


def _pow2(x):
    return triton.next_power_of_2(max(int(x), 1))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE: fp32 inputs get full-precision products (the GPU default would be tf32). The interpreter
    # always takes this path because its bf16 tl.dot is wrong (Triton 3.9); exact fp32 products of
    # bf16 operands with fp32 accumulation are what the tensor cores compute anyway.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _clean_block(j, NB):
    # -1 padding and out-of-range indices both mean "no block": map them past the last block.
    return tl.where((j < 0) | (j >= NB), NB, j)


@triton.jit
def _load_kv_block(k, v, kv_base, j, key0, BS, S, H, D,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Keys key0 .. key0 + BLOCK_S - 1 of l'-block j (key0 > 0 for the later sub-tiles of a split block).
    o_s = key0 + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    s_pos = j * BS + o_s
    s_ok = (o_s < BS) & (s_pos < S)
    off = kv_base + s_pos[:, None].to(tl.int64) * (H * D) + o_d[None, :]
    m = s_ok[:, None] & (o_d[None, :] < D)
    return tl.load(k + off, mask=m, other=0.), tl.load(v + off, mask=m, other=0.), s_pos, s_ok


@triton.jit
def _tile_rows(i_t, i_b, i_h, T, HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, N_SEL: tl.constexpr,
               TT: tl.constexpr, BLOCK_M: tl.constexpr):
    # Rows of a tile: TT consecutive tokens x the G query heads of kv head i_h, token-major.
    G: tl.constexpr = HQ // H
    r = tl.arange(0, BLOCK_M)
    t = i_t * TT + r // G
    row_ok = (r < TT * G) & (t < T)
    hq = i_h * G + r % G
    tok = (i_b * T + t).to(tl.int64)
    row = tok * HQ + hq
    idx_row = (tok * HS + hq // (HQ // HS)) * N_SEL
    return t, row_ok, row, idx_row


@triton.jit
def _row_lists(idx, idx_row, row_ok, N_SEL: tl.constexpr, N_P2: tl.constexpr):
    # Every row's block list, [BLOCK_M, N_P2], held in registers for the membership test of the
    # union walk (-1 where there is nothing: it never equals a block of the union).
    o_n = tl.arange(0, N_P2)
    return tl.load(idx + idx_row[:, None] + o_n[None, :], mask=row_ok[:, None] & (o_n[None, :] < N_SEL), other=-1)


@triton.jit
def _walk_len(ucnt, tile, N_SEL: tl.constexpr, WALK: tl.constexpr):
    # Steps of a tile's block walk: the n slots of its one list, or the size of its rows' union.
    if WALK == 0:
        return N_SEL
    else:
        return tl.load(ucnt + tile)


@triton.jit
def _walk_step(i, k, v, kv_base, idx, idx_tok, uni, u_base, lists, t, i_t, row_ok, NB, BS, S, H, D,
               WALK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # K/V tile of step i of the walk and which (row, key) pairs of it are visible.
    # WALK 0: one token and one shared list for the whole tile, slot i of it (padding masked).
    # WALK 1: block i of the tile's sorted union; a row takes part where the block is in its list.
    if WALK == 0:
        j = _clean_block(tl.load(idx + idx_tok + i), NB)
        b_k, b_v, s_pos, s_ok = _load_kv_block(k, v, kv_base, j, 0, BS, S, H, D, BLOCK_S, BLOCK_D)
        vis = (row_ok[:, None] & s_ok[None, :] & (s_pos[None, :] <= i_t)) & (j < NB)
    else:
        j = tl.load(uni + u_base + i)
        b_k, b_v, s_pos, s_ok = _load_kv_block(k, v, kv_base, j, 0, BS, S, H, D, BLOCK_S, BLOCK_D)
        hit = tl.max((lists == j).to(tl.int32), axis=1) > 0
        vis = hit[:, None] & s_ok[None, :] & (s_pos[None, :] <= t[:, None])
    return b_k, b_v, vis


@triton.jit
def _walk_setup(idx, idx_row, row_ok, i_t, i_b, i_h, T, HS: tl.constexpr, H: tl.constexpr, N_SEL: tl.constexpr,
                N_P2: tl.constexpr, WALK: tl.constexpr):
    # (tile id, first index slot of the token for WALK 0, first union slot, row lists for WALK 1).
    tile = (i_b * tl.num_programs(0) + i_t) * H + i_h
    idx_tok = ((i_b * T + i_t).to(tl.int64) * HS + i_h) * N_SEL
    if WALK == 0:
        lists = row_ok
    else:
        lists = _row_lists(idx, idx_row, row_ok, N_SEL, N_P2)
    return tile, idx_tok, lists


@triton.jit
def _sel_fwd_kernel(q, k, v, o, lse, idx, uni, ucnt, T, S, BS, UL, scale_log2,
                HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, N_SEL: tl.constexpr,
                N_P2: tl.constexpr, TT: tl.constexpr, WALK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    # WALK 0: one token, one shared list (fixed loop over the n slots); 1: counted loop over the
    # precomputed union `uni` (UL slots per tile, ucnt valid). BLOCK_S is l' rounded up to a power of two.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NB = tl.cdiv(S, BS)
    t, row_ok, row, idx_row = _tile_rows(i_t, i_b, i_h, T, HQ, H, HS, N_SEL, TT, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    qd_mask = row_ok[:, None] & (o_d[None, :] < D)
    b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=qd_mask, other=0.)
    kv_base = i_b.to(tl.int64) * S * H * D + i_h * D
    tile, idx_tok, lists = _walk_setup(idx, idx_row, row_ok, i_t, i_b, i_h, T, HS, H, N_SEL, N_P2, WALK)
    u_base = tile.to(tl.int64) * UL

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, _walk_len(ucnt, tile, N_SEL, WALK)):
        b_k, b_v, vis = _walk_step(i, k, v, kv_base, idx, idx_tok, uni, u_base, lists, t, i_t, row_ok, NB, BS, S,
                                   H, D, WALK, BLOCK_S, BLOCK_D)
        m_i, l_i, acc = _online_softmax_step(b_q, b_k, b_v, vis, m_i, l_i, acc, scale_log2, IEEE)

    # A row that saw no key gets o = 0 and lse = -inf, as in the reference.
    empty = l_i == 0.
    l_safe = tl.where(empty, 1., l_i)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(o + row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=qd_mask)
    tl.store(lse + row, b_lse, mask=row_ok)


@triton.jit
def _online_softmax_step(b_q, b_k, b_v, vis, m_i, l_i, acc, scale_log2, IEEE: tl.constexpr):
    s = _dot(b_q, tl.trans(b_k), IEEE) * scale_log2
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows with nothing visible yet keep m = -inf; shift them by 0 so no inf - inf appears.
    m_safe = tl.where(m_new == float("-inf"), 0., m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(b_v.dtype), b_v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _dq_step(b_q, b_do, b_k, b_v, vis, lse2, delta, dq, scale_log2, IEEE: tl.constexpr):
    s = _dot(b_q, tl.trans(b_k), IEEE) * scale_log2
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.)
    dp = _dot(b_do, tl.trans(b_v), IEEE)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(b_k.dtype), b_k, IEEE)


@triton.jit
def _sel_dq_kernel(q, k, v, do, lse, delta, dq, idx, uni, ucnt, T, S, BS, UL, scale, scale_log2,
               HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, N_SEL: tl.constexpr,
               N_P2: tl.constexpr, TT: tl.constexpr, WALK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    # Same tiling and block walk as _sel_fwd_kernel; P is recomputed from the saved log-sum-exp.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NB = tl.cdiv(S, BS)
    t, row_ok, row, idx_row = _tile_rows(i_t, i_b, i_h, T, HQ, H, HS, N_SEL, TT, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    qd_mask = row_ok[:, None] & (o_d[None, :] < D)
    b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=qd_mask, other=0.)
    b_do = tl.load(do + row[:, None] * D + o_d[None, :], mask=qd_mask, other=0.)
    # lse = -inf (a row that saw nothing) becomes +inf so that exp2(s - lse) is 0, not NaN.
    b_lse = tl.load(lse + row, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(delta + row, mask=row_ok, other=0.)
    kv_base = i_b.to(tl.int64) * S * H * D + i_h * D
    tile, idx_tok, lists = _walk_setup(idx, idx_row, row_ok, i_t, i_b, i_h, T, HS, H, N_SEL, N_P2, WALK)
    u_base = tile.to(tl.int64) * UL

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, _walk_len(ucnt, tile, N_SEL, WALK)):
        b_k, b_v, vis = _walk_step(i, k, v, kv_base, idx, idx_tok, uni, u_base, lists, t, i_t, row_ok, NB, BS, S,
                                   H, D, WALK, BLOCK_S, BLOCK_D)
        b_dq = _dq_step(b_q, b_do, b_k, b_v, vis, lse2, b_delta, b_dq, scale_log2, IEEE)
    tl.store(dq + row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=qd_mask)


@triton.jit
def _sel_dkv_kernel(q, k, v, do, lse, delta, dk, dv, part_dk, part_dv, entries,
                item_key, item_lo, item_hi, item_slot, T, S, BS, scale, scale_log2,
                HQ: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr):
    # One work item: a slice [lo, hi) of the entries that picked kv block `key` = (b, h, j).
    # An entry t * HS + hs stands for the GS = HQ // HS query heads that share index head hs.
    GS: tl.constexpr = HQ // HS
    w = tl.program_id(0)
    key = tl.load(item_key + w)
    if key >= 0:
        NB = tl.cdiv(S, BS)
        i_j = key % NB
        i_b = key // NB // H
        i_h = key // NB % H
        lo = tl.load(item_lo + w)
        hi = tl.load(item_hi + w)
        kv_base = i_b.to(tl.int64) * S * H * D + i_h * D
        b_k, b_v, s_pos, s_ok = _load_kv_block(k, v, kv_base, i_j, 0, BS, S, H, D, BLOCK_S, BLOCK_D)
        o_d = tl.arange(0, BLOCK_D)
        d_ok = o_d < D
        r = tl.arange(0, BLOCK_R)
        r_ok = r < BLOCK_E * GS

        b_dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for e0 in tl.range(lo, hi, BLOCK_E):
            e = e0 + r // GS
            e_ok = r_ok & (e < hi)
            ent = tl.load(entries + e, mask=e_ok, other=0)
            t = ent // HS
            hq = (ent % HS) * GS + r % GS
            row = (i_b * T + t).to(tl.int64) * HQ + hq
            m_rd = e_ok[:, None] & d_ok[None, :]
            b_q = tl.load(q + row[:, None] * D + o_d[None, :], mask=m_rd, other=0.)
            b_do = tl.load(do + row[:, None] * D + o_d[None, :], mask=m_rd, other=0.)
            b_lse = tl.load(lse + row, mask=e_ok, other=float("-inf"))
            lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
            b_delta = tl.load(delta + row, mask=e_ok, other=0.)

            s = _dot(b_q, tl.trans(b_k), IEEE) * scale_log2
            vis = e_ok[:, None] & s_ok[None, :] & (s_pos[None, :] <= t[:, None])
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.)
            b_dv += _dot(tl.trans(p.to(b_do.dtype)), b_do, IEEE)
            dp = _dot(b_do, tl.trans(b_v), IEEE)
            ds = p * (dp - b_delta[:, None])
            b_dk += _dot(tl.trans(ds.to(b_q.dtype)), b_q, IEEE)
        b_dk *= scale

        slot = tl.load(item_slot + w)
        if slot < 0:
            # The block's only item: write the gradient directly.
            off = kv_base + s_pos[:, None].to(tl.int64) * (H * D) + o_d[None, :]
            m = s_ok[:, None] & d_ok[None, :]
            tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=m)
            tl.store(dv + off, b_dv.to(dv.dtype.element_ty), mask=m)
        else:
            o_s = tl.arange(0, BLOCK_S)
            off = slot.to(tl.int64) * (BLOCK_S * BLOCK_D) + o_s[:, None] * BLOCK_D + o_d[None, :]
            tl.store(part_dk + off, b_dk)
            tl.store(part_dv + off, b_dv)


@triton.jit
def _sel_dkv_reduce_kernel(part_dk, part_dv, dk, dv, key_items, key_first_slot, S, BS,
                       H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Sum the fp32 partials of a split block in item order: deterministic, no atomics.
    key = tl.program_id(0)
    n_items = tl.load(key_items + key)
    if n_items > 1:
        NB = tl.cdiv(S, BS)
        i_j = key % NB
        i_b = key // NB // H
        i_h = key // NB % H
        first = tl.load(key_first_slot + key)
        o_s = tl.arange(0, BLOCK_S)
        o_d = tl.arange(0, BLOCK_D)
        part_off = o_s[:, None] * BLOCK_D + o_d[None, :]
        b_dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for i in range(n_items):
            base = (first + i).to(tl.int64) * (BLOCK_S * BLOCK_D)
            b_dk += tl.load(part_dk + base + part_off)
            b_dv += tl.load(part_dv + base + part_off)
        s_pos = i_j * BS + o_s
        s_ok = (o_s < BS) & (s_pos < S)
        off = (i_b.to(tl.int64) * S * H * D + i_h * D) + s_pos[:, None].to(tl.int64) * (H * D) + o_d[None, :]
        m = s_ok[:, None] & (o_d[None, :] < D)
        tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=m)
        tl.store(dv + off, b_dv.to(dv.dtype.element_ty), mask=m)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_cfg(q, k, indices, sel_block):
    """Constexprs and grid of the forward and dQ kernels. A tile holds max(MIN_ROWS, G) rows (G rounded
    up to a power of two): TT = BLOCK_M // G tokens. One token with one shared list walks its n slots
    (WALK 0); anything else walks the sorted union of its rows' lists (WALK 1)."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    Hs, n = indices.shape[2], indices.shape[3]
    block_m = max(MIN_ROWS, _pow2(HQ // H))
    tt = max(1, block_m // (HQ // H))
    walk = 0 if tt == 1 and Hs == H else 1
    return dict(HQ=HQ, H=H, HS=Hs, D=D, N_SEL=n, N_P2=_pow2(n), TT=tt, WALK=walk, BLOCK_M=block_m,
                BLOCK_S=max(16, _pow2(sel_block)), BLOCK_D=max(16, _pow2(D)),
                IEEE=q.dtype == torch.float32 or _interpreting()), (ceil_div(T, tt), B * H)


def _tile_union(indices, H, NB, tt):
    """Sorted union of the block lists of each forward/dQ tile, with torch and no host sync.

    Returns uni [B, ceil(T / tt), H, UL] int32 (a tile's distinct valid blocks ascending, then NB)
    and cnt [B, ceil(T / tt), H] int32 (how many are valid). A tile's lists are those of its tt
    tokens and of the Hs / H index heads of its kv head.
    """
    B, T, Hs, n = indices.shape
    nt = ceil_div(T, tt)
    x = torch.where((indices < 0) | (indices >= NB), NB, indices)
    if nt * tt != T:
        x = torch.cat([x, x.new_full((B, nt * tt - T, Hs, n), NB)], dim=1)
    x = x.view(B, nt, tt, H, Hs // H, n).transpose(2, 3).reshape(B, nt, H, tt * (Hs // H) * n)
    x = x.sort(dim=-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, NB, x).sort(dim=-1).values
    ul = min(x.shape[-1], NB)
    uni = x[..., :ul].contiguous()
    return uni, (uni < NB).sum(-1, dtype=torch.int32)


def _walk_args(cfg, indices, S, sel_block):
    """(uni, cnt, UL) for the union walk; the index tensor itself as a dummy for the one-list walk."""
    if cfg["WALK"] != 1:
        return indices, indices, 1
    uni, cnt = _tile_union(indices, cfg["H"], ceil_div(S, sel_block), cfg["TT"])
    return uni, cnt, uni.shape[-1]


def _dkv_chunk(total, n_keys):
    """Entries per dK/dV work item: twice the mean per key (the tests shrink it to split every block)."""
    return max(64, ceil_div(2 * total, n_keys))


def _dkv_items(indices, H, S, sel_block):
    """Reverse index and work items for the dK/dV kernel, with torch ops and no host sync.

    Returns entries (int32 t * Hs + hs, grouped by kv block key (b, h, j) and in token order within
    a key), per-item (key, lo, hi, slot), per-key (number of items, first partial slot), and the
    number of partial slots to allocate. Every key gets at least one item, so blocks nobody picked
    still get their (zero) gradient written.
    """
    B, T, Hs, n = indices.shape
    dev = indices.device
    NB = ceil_div(S, sel_block)
    NK = B * H * NB
    total = B * T * Hs * n

    b = torch.arange(B, device=dev, dtype=torch.int32).view(B, 1, 1, 1)
    h = (torch.arange(Hs, device=dev, dtype=torch.int32) // (Hs // H)).view(1, 1, Hs, 1)
    ok = (indices >= 0) & (indices < NB)
    keys = torch.where(ok, (b * H + h) * NB + indices, NK).flatten()
    # Stable: entries of one key stay in (t, hs) order, so accumulation order is fixed run to run.
    sorted_keys, order = torch.sort(keys, stable=True)
    entries = ((order // n) % (T * Hs)).to(torch.int32)
    offsets = torch.searchsorted(sorted_keys, torch.arange(NK + 1, device=dev, dtype=torch.int32))
    counts = offsets[1:] - offsets[:-1]

    # Items hold at most `chunk` entries, twice the mean per key: no item is much heavier than the
    # average block, and at most NK + total // chunk items and 2 * total // chunk partials exist.
    chunk = _dkv_chunk(total, NK)
    key_items = torch.clamp(ceil_div(counts, chunk), min=1)
    ends = torch.cumsum(key_items, 0)
    n_work = NK + total // chunk
    w = torch.arange(n_work, device=dev)
    item_key = torch.searchsorted(ends, w, right=True)
    active = item_key < NK
    kc = item_key.clamp(max=NK - 1)
    part = w - (ends[kc] - key_items[kc])
    lo = offsets[kc] + part * chunk
    hi = torch.minimum(lo + chunk, offsets[kc + 1])
    split = active & (key_items[kc] > 1)
    item_slot = torch.where(split, torch.cumsum(split, 0) - 1, -1)
    hot_items = torch.where(key_items > 1, key_items, 0)
    key_first_slot = torch.cumsum(hot_items, 0) - hot_items
    item_key = torch.where(active, item_key, -1)
    return (entries, item_key, lo, hi, item_slot, key_items, key_first_slot,
            max(1, 2 * total // chunk))


def selection_fwd(q, k, v, indices, sel_block, scale, o, lse):
    """Launch the forward into preallocated o [B, T, HQ, D] and lse [B, T, HQ] fp32 (contiguous
    inputs); the tests hand in NaN-filled buffers to catch unwritten elements."""
    T, S = q.shape[1], k.shape[1]
    cfg, grid = _launch_cfg(q, k, indices, sel_block)
    uni, cnt, ul = _walk_args(cfg, indices, S, sel_block)
    # 4 warps, Triton's default 3 stages: 2, 3 or 4 stages and 8 warps measured slower (H100).
    _sel_fwd_kernel[grid](q, k, v, o, lse, indices, uni, cnt, T, S, sel_block, ul, scale * LOG2E, num_warps=4,
                          **cfg)


def selection_dq(do, q, k, v, lse, delta, indices, sel_block, scale, dq):
    """dQ into preallocated dq; delta = rowsum(dO * O) in fp32 [B, T, HQ]."""
    T, S = q.shape[1], k.shape[1]
    cfg, grid = _launch_cfg(q, k, indices, sel_block)
    uni, cnt, ul = _walk_args(cfg, indices, S, sel_block)
    _sel_dq_kernel[grid](q, k, v, do, lse, delta, dq, indices, uni, cnt, T, S, sel_block, ul, scale, scale * LOG2E,
                         num_warps=4, **cfg)


def selection_dkv(do, q, k, v, lse, delta, indices, sel_block, scale, dk, dv):
    """dK, dV into preallocated dk, dv: reverse index, work items, then the two kernels."""
    B, T, HQ, D = q.shape
    S, H, Hs = k.shape[1], k.shape[2], indices.shape[2]
    (entries, item_key, item_lo, item_hi, item_slot, key_items, key_first_slot,
     n_slots) = _dkv_items(indices, H, S, sel_block)
    block_e = max(1, DKV_ROWS // (HQ // Hs))
    block_s, block_d = max(16, _pow2(sel_block)), max(16, _pow2(D))
    ieee = q.dtype == torch.float32 or _interpreting()
    part_dk = torch.empty(n_slots, block_s, block_d, dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    _sel_dkv_kernel[(item_key.numel(),)](
        q, k, v, do, lse, delta, dk, dv, part_dk, part_dv, entries, item_key, item_lo, item_hi, item_slot,
        T, S, sel_block, scale, scale * LOG2E, HQ=HQ, H=H, HS=Hs, D=D, BLOCK_E=block_e,
        BLOCK_R=_pow2(block_e * (HQ // Hs)), BLOCK_S=block_s, BLOCK_D=block_d, IEEE=ieee,
        num_warps=8)  # the 64 x 128 fp32 dK and dV accumulators want 8 warps (4 measured slower)
    _sel_dkv_reduce_kernel[(key_items.numel(),)](part_dk, part_dv, dk, dv, key_items, key_first_slot, S, sel_block,
                                             H=H, D=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)


def selection_bwd(do, q, k, v, o, lse, indices, sel_block, scale, dq, dk, dv):
    """Launch the backward into preallocated dq, dk, dv (contiguous inputs)."""
    delta = (do.float() * o.float()).sum(-1)
    selection_dq(do, q, k, v, lse, delta, indices, sel_block, scale, dq)
    selection_dkv(do, q, k, v, lse, delta, indices, sel_block, scale, dk, dv)


@torch.library.custom_op("nsa::selection_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, sel_block: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, indices = (x.contiguous() for x in (q, k, v, indices))
    o = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    selection_fwd(q, k, v, indices, sel_block, scale, o, lse)
    return o, lse


@_fwd_op.register_fake
def _(q, k, v, indices, sel_block, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("nsa::selection_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, indices: torch.Tensor, sel_block: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v, o, lse, indices = (x.contiguous() for x in (do, q, k, v, o, lse, indices))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    selection_bwd(do, q, k, v, o, lse, indices, sel_block, scale, dq, dk, dv)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, indices, sel_block, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, sel_block, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, indices, o, lse)
    ctx.sel_block, ctx.scale = sel_block, scale


def _backward(ctx, do, dlse):
    # lse is an internal output (the public function drops it), so its gradient is never used.
    q, k, v, indices, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, indices, ctx.sel_block, ctx.scale)
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
