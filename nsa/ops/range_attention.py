"""One flash-attention kernel for every branch where query t sees a contiguous key range.

The compressed branch and the sliding window differ only in which keys a query sees, and in both the
visible keys of token t form one interval [lo(t), hi(t)] whose ends never decrease with t:

    hi(t) = hi_base + num_visible_blocks(t, block, stride)   (clamped to S - 1)
    lo(t) = max(t - lo_back, 0)

where num_visible_blocks(t, block, stride) = max(t + stride - block + 1, 0) // stride counts the
blocks of `block` tokens at `stride` whose last token is <= t (`nsa.ops.utils`, docs/SPEC.md section 1).

- compressed (m mem): key r < m is a memory key, always visible; key m + i is compressed block i,
  visible iff i*stride + block - 1 <= t. Both together are the prefix [0, hi(t)] with
  hi_base = m - 1, lo_back = "infinity".
- window w: one-token blocks at stride 1, hi(t) = -1 + (t + 1) = t, lo(t) = t - w + 1
  (hi_base=-1, block=1, stride=1, lo_back=w-1).

GQA layout: q [B, T, HQ, D], k/v [B, S, H, D], HQ = G * H. One program owns one kv head and a tile
of BLOCK_M query rows made of BLOCK_M / GP consecutive tokens times GP heads (GP = G rounded up to a
power of two, padded rows masked), so every K/V tile it loads serves all G heads of the group.

Forward writes o and the fp32 log-sum-exp (natural log; -inf for a row that sees no key, whose o is
0). Backward runs two kernels and no atomics: dq per query tile (which also writes delta = rowsum(o *
do)), then dk/dv per key tile, looping over exactly the query tiles that can see that key tile. For
the prefix rule the first key tiles are seen by every query, so there the query range is split over
many programs (so the last wave is short) that write fp32 partial sums, added afterwards in a fixed
order by `_range_sum_splits_kernel`: deterministic. Every kernel runs the tiles that lie wholly inside all
its rows' intervals through an unmasked loop, the boundary tiles through a masked one. Forward and dq
programs start with the last query tiles, which see the most keys.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa.ops.utils import (LN2_C, LOG2E, LOG2E_C, dot, dot_precision, fitting, interpreting, num_sms,
                           num_visible_blocks)

# A lower bound no real index reaches; kept well inside int32 so t + NO_LO_BOUND cannot overflow.
NO_LO_BOUND = 2**30

# Output allocator; the tests swap in a NaN-filled one to catch elements a kernel forgets to write.
_empty = torch.empty


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _hi(t, HI_BASE, BLOCK, STRIDE):
    """Last key query t sees (before the clamp to S - 1)."""
    return HI_BASE + num_visible_blocks(t, BLOCK, STRIDE)


@triton.jit
def _first_query(s, HI_BASE, BLOCK, STRIDE):
    """First query that sees key s (hi(t) >= s): 0 if hi(0) already reaches it, else the last token of
    block s - HI_BASE - 1, whose visibility makes hi(t) = s."""
    return tl.where(s <= _hi(0, HI_BASE, BLOCK, STRIDE), 0, (s - HI_BASE - 1) * STRIDE + BLOCK - 1)


@triton.jit
def _query_rows(t0, T, G, GP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row r of a query tile is token t0 + r // GP, head r % GP of the group."""
    o_r = tl.arange(0, BLOCK_M)
    o_t = t0 + o_r // GP
    o_g = o_r % GP
    return o_t, o_g, (o_t < T) & (o_g < G)


@triton.jit
def _key_split(t0, t_last, T, S, HI_BASE, BLOCK, STRIDE, LO_BACK, BLOCK_N: tl.constexpr):
    """A query tile's key range [start, end) cut into masked head [start, full), unmasked middle
    [full, tail) and masked tail [tail, end), all tile-aligned from start. A key tile in [full, tail) is
    seen by every token of the query tile (its lo bound is <= the tile's first key, its hi bound >= the
    tile's last key, < S), so its scores need no mask; lo and hi never decrease with t, so the tile's
    last / first token decide. Returns (start, end of the head, full, tail, end)."""
    start = (tl.maximum(t0 - LO_BACK, 0) // BLOCK_N) * BLOCK_N
    end = tl.minimum(_hi(t_last, HI_BASE, BLOCK, STRIDE), S - 1) + 1
    lo_last = tl.maximum(t_last - LO_BACK, 0)
    hi_first = tl.minimum(_hi(t0, HI_BASE, BLOCK, STRIDE), S - 1)  # >= -1
    full = tl.maximum(start, tl.cdiv(lo_last, BLOCK_N) * BLOCK_N)
    tail = tl.maximum(full, ((hi_first + 1) // BLOCK_N) * BLOCK_N)
    return start, tl.minimum(full, end), full, tail, end


@triton.jit
def _fwd_tiles(b_acc, b_l, b_m, b_q, k, v, o_kv, o_lo, o_hi, qk_scale, first, last, S, H, o_d, m_d,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """Online-softmax update over key tiles [first, last); MASK: apply the per-row interval (else every
    key of these tiles is visible to every row)."""
    for i_s in range(first, last, BLOCK_N):
        o_s = i_s + tl.arange(0, BLOCK_N)
        o_sd = o_kv + o_s.to(tl.int64) * (H * D)
        if MASK:
            m_sd = (o_s < S)[:, None] & m_d[None, :]
            b_k = tl.load(k + o_sd[:, None] + o_d[None, :], mask=m_sd, other=0.0)
            b_v = tl.load(v + o_sd[:, None] + o_d[None, :], mask=m_sd, other=0.0)
        else:
            b_k = tl.load(k + o_sd[:, None] + o_d[None, :], mask=m_d[None, :], other=0.0)
            b_v = tl.load(v + o_sd[:, None] + o_d[None, :], mask=m_d[None, :], other=0.0)
        b_s = dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale  # log2 units
        if MASK:
            m_vis = (o_s[None, :] >= o_lo[:, None]) & (o_s[None, :] <= o_hi[:, None])
            b_s = tl.where(m_vis, b_s, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            # A row that has seen no key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        else:
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # finite: every row sees a key here
            b_m_safe = b_m_new
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, PREC, UPCAST)
        b_m = b_m_new
    return b_acc, b_l, b_m


# The forward kernels (prefill's) do not specialise on lengths (Triton would compile a variant for a
# multiple of 16, or for 1): a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["T", "S"])
def _range_fwd_kernel(q, k, v, o, lse, qk_scale, T, S, H, G, HI_BASE, BLOCK, STRIDE, LO_BACK,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    # Last query tiles first: they see the most keys, so the long programs start in the first wave.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    HQ = H * G
    t0 = i_m * BLOCK_T
    o_t, o_g, m_row = _query_rows(t0, T, G, GP, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_q = ((i_b * T + o_t).to(tl.int64) * HQ + i_h * G + o_g) * D
    b_q = tl.load(q + o_q[:, None] + o_d[None, :], mask=m_row[:, None] & m_d[None, :], other=0.0)

    o_lo = tl.maximum(o_t - LO_BACK, 0)
    o_hi = tl.minimum(_hi(o_t, HI_BASE, BLOCK, STRIDE), S - 1)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    start, head_end, full, tail, end = _key_split(t0, t_last, T, S, HI_BASE, BLOCK, STRIDE, LO_BACK, BLOCK_N)
    o_kv = (i_b.to(tl.int64) * S * H + i_h) * D

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    b_acc, b_l, b_m = _fwd_tiles(b_acc, b_l, b_m, b_q, k, v, o_kv, o_lo, o_hi, qk_scale, start, head_end, S, H,
                                 o_d, m_d, D, BLOCK_N, True, PREC, UPCAST)
    b_acc, b_l, b_m = _fwd_tiles(b_acc, b_l, b_m, b_q, k, v, o_kv, o_lo, o_hi, qk_scale, full, tail, S, H,
                                 o_d, m_d, D, BLOCK_N, False, PREC, UPCAST)
    b_acc, b_l, b_m = _fwd_tiles(b_acc, b_l, b_m, b_q, k, v, o_kv, o_lo, o_hi, qk_scale, tail, end, S, H,
                                 o_d, m_d, D, BLOCK_N, True, PREC, UPCAST)

    m_seen = b_l > 0
    b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]
    tl.store(o + o_q[:, None] + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    b_lse = tl.where(m_seen, (b_m + tl.log2(tl.where(m_seen, b_l, 1.0))) * LN2_C, float("-inf"))
    tl.store(lse + (i_b * T + o_t).to(tl.int64) * HQ + i_h * G + o_g, b_lse, mask=m_row)


@triton.jit
def _load_lse2(lse, o_row, m_row):
    """lse in log2 units, +inf for padded rows and rows that saw no key, so their p = exp2(s - lse) = 0."""
    b_lse = tl.load(lse + o_row, mask=m_row, other=float("inf"))
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse) * LOG2E_C


@triton.jit
def _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, k, v, o_kv, o_lo, o_hi, qk_scale, first, last, S, H, o_d, m_d,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    for i_s in range(first, last, BLOCK_N):
        o_s = i_s + tl.arange(0, BLOCK_N)
        o_sd = o_kv + o_s.to(tl.int64) * (H * D)
        if MASK:
            m_sd = (o_s < S)[:, None] & m_d[None, :]
        else:
            m_sd = m_d[None, :]
        b_k = tl.load(k + o_sd[:, None] + o_d[None, :], mask=m_sd, other=0.0)
        b_v = tl.load(v + o_sd[:, None] + o_d[None, :], mask=m_sd, other=0.0)
        b_s = dot(b_q, tl.trans(b_k), PREC, UPCAST)
        b_p = tl.exp2(b_s * qk_scale - b_lse2[:, None])
        if MASK:
            m_vis = (o_s[None, :] >= o_lo[:, None]) & (o_s[None, :] <= o_hi[:, None])
            b_p = tl.where(m_vis, b_p, 0.0)
        b_dp = dot(b_do, tl.trans(b_v), PREC, UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += dot(b_ds.to(b_k.dtype), b_k, PREC, UPCAST)
    return b_dq


@triton.jit
def _range_dq_kernel(q, k, v, o, do, lse, dlse, delta, dq, qk_scale, scale, T, S, H, G, HI_BASE, BLOCK, STRIDE,
                     LO_BACK, D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_DLSE: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest programs first
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    HQ = H * G
    t0 = i_m * BLOCK_T
    o_t, o_g, m_row = _query_rows(t0, T, G, GP, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_row = (i_b * T + o_t).to(tl.int64) * HQ + i_h * G + o_g
    o_q = o_row * D
    m_qd = m_row[:, None] & m_d[None, :]
    b_q = tl.load(q + o_q[:, None] + o_d[None, :], mask=m_qd, other=0.0)
    b_do = tl.load(do + o_q[:, None] + o_d[None, :], mask=m_qd, other=0.0)
    b_o = tl.load(o + o_q[:, None] + o_d[None, :], mask=m_qd, other=0.0)
    # delta = rowsum(o * do), the softmax backward's correction; stored for the dk/dv kernel. A gradient
    # of lse adds dlse * P to dS (d lse / d s = P), which is dS = P * (dP - (delta - dlse)).
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_row, mask=m_row, other=0.0)
    tl.store(delta + o_row, b_delta, mask=m_row)
    # +inf for padded rows and rows that see no key: their p is 0 with or without the mask.
    b_lse2 = _load_lse2(lse, o_row, m_row)

    o_lo = tl.maximum(o_t - LO_BACK, 0)
    o_hi = tl.minimum(_hi(o_t, HI_BASE, BLOCK, STRIDE), S - 1)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    start, head_end, full, tail, end = _key_split(t0, t_last, T, S, HI_BASE, BLOCK, STRIDE, LO_BACK, BLOCK_N)
    o_kv = (i_b.to(tl.int64) * S * H + i_h) * D

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, k, v, o_kv, o_lo, o_hi, qk_scale, start, head_end, S, H,
                     o_d, m_d, D, BLOCK_N, True, PREC, UPCAST)
    b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, k, v, o_kv, o_lo, o_hi, qk_scale, full, tail, S, H,
                     o_d, m_d, D, BLOCK_N, False, PREC, UPCAST)
    b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse2, b_delta, k, v, o_kv, o_lo, o_hi, qk_scale, tail, end, S, H,
                     o_d, m_d, D, BLOCK_N, True, PREC, UPCAST)
    tl.store(dq + o_q[:, None] + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_qd)


@triton.jit
def _query_span(s0, T, S, HI_BASE, BLOCK, STRIDE, LO_BACK, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles [first, end) that see some key of the key tile [s0, s0 + BLOCK_N): hi(t) >= s0
    (invert hi) and lo(t) <= the tile's last key."""
    s_last = tl.minimum(s0 + BLOCK_N - 1, S - 1)
    t_first = _first_query(s0, HI_BASE, BLOCK, STRIDE)
    t_end = tl.minimum(s_last + LO_BACK, T - 1) + 1
    return t_first // BLOCK_T, tl.cdiv(t_end, BLOCK_T)


@triton.jit
def _dkdv_tiles(b_dk, b_dv, b_k, b_v, q, do, lse, delta, o_s, first, last, i_b, T, H, G, HI_BASE, BLOCK, STRIDE,
                LO_BACK, qk_scale, o_d, m_d, D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    HQ = H * G
    i_h = (tl.program_id(1) % H)
    for i_m in range(first, last):
        o_t, o_g, m_row = _query_rows(i_m * BLOCK_T, T, G, GP, BLOCK_M)
        o_row = (i_b * T + o_t).to(tl.int64) * HQ + i_h * G + o_g
        m_qd = m_row[:, None] & m_d[None, :]
        b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_qd, other=0.0)
        b_do = tl.load(do + o_row[:, None] * D + o_d[None, :], mask=m_qd, other=0.0)
        # +inf for padded rows and rows that see no key: p = 0 for them even without the mask.
        b_lse2 = _load_lse2(lse, o_row, m_row)
        b_delta = tl.load(delta + o_row, mask=m_row, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M], so dk and dv come out of plain dots.
        b_s_t = dot(b_k, tl.trans(b_q), PREC, UPCAST)
        b_p_t = tl.exp2(b_s_t * qk_scale - b_lse2[None, :])
        if MASK:
            o_lo = tl.maximum(o_t - LO_BACK, 0)
            o_hi = _hi(o_t, HI_BASE, BLOCK, STRIDE)
            m_vis = (o_s[:, None] >= o_lo[None, :]) & (o_s[:, None] <= o_hi[None, :])
            b_p_t = tl.where(m_vis, b_p_t, 0.0)
        b_dv += dot(b_p_t.to(b_do.dtype), b_do, PREC, UPCAST)
        b_dp_t = dot(b_v, tl.trans(b_do), PREC, UPCAST)
        b_ds_t = b_p_t * (b_dp_t - b_delta[None, :])
        b_dk += dot(b_ds_t.to(b_q.dtype), b_q, PREC, UPCAST)
    return b_dk, b_dv


@triton.jit
def _range_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, qk_scale, scale, T, S, H, G,
                       HI_BASE, BLOCK, STRIDE, LO_BACK, TILES_PER_SPLIT,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_split = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    s0 = i_n * BLOCK_N
    o_s = s0 + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_kv = ((i_b * S + o_s).to(tl.int64) * H + i_h) * D
    m_kv = (o_s < S)[:, None] & m_d[None, :]

    qt_first, qt_end = _query_span(s0, T, S, HI_BASE, BLOCK, STRIDE, LO_BACK, BLOCK_T, BLOCK_N)
    qt_first = tl.maximum(qt_first, i_split * TILES_PER_SPLIT)
    qt_end = tl.minimum(qt_end, (i_split + 1) * TILES_PER_SPLIT)
    # With SPLIT, dk/dv are fp32 partial buffers [SPLIT, B, S, H, D] of which `_range_sum_splits_kernel` reads
    # only the splits with some query tile: an empty one writes nothing.
    if (qt_first < qt_end) | (SPLIT == 0):
        b_k = tl.load(k + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.0)
        b_v = tl.load(v + o_kv[:, None] + o_d[None, :], mask=m_kv, other=0.0)
        # Query tiles that see the whole key tile (every row: lo(t) <= s0, hi(t) >= its last key, and keys
        # >= S, which only the last tile has, are never stored) need no mask: the middle [full, tail).
        s_last = tl.minimum(s0 + BLOCK_N - 1, S - 1)
        qt_full = tl.maximum(qt_first, tl.cdiv(_first_query(s_last, HI_BASE, BLOCK, STRIDE), BLOCK_T))
        qt_tail = tl.maximum(qt_full, tl.minimum((s0 + LO_BACK + 1) // BLOCK_T, qt_end))
        b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        b_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, q, do, lse, delta, o_s, qt_first, tl.minimum(qt_full, qt_end),
                                 i_b, T, H, G, HI_BASE, BLOCK, STRIDE, LO_BACK, qk_scale, o_d, m_d, D, GP, BLOCK_M,
                                 True, PREC, UPCAST)
        b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, q, do, lse, delta, o_s, qt_full, qt_tail,
                                 i_b, T, H, G, HI_BASE, BLOCK, STRIDE, LO_BACK, qk_scale, o_d, m_d, D, GP, BLOCK_M,
                                 False, PREC, UPCAST)
        b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, q, do, lse, delta, o_s, qt_tail, qt_end,
                                 i_b, T, H, G, HI_BASE, BLOCK, STRIDE, LO_BACK, qk_scale, o_d, m_d, D, GP, BLOCK_M,
                                 True, PREC, UPCAST)
        o_part = i_split.to(tl.int64) * (tl.num_programs(1) // H) * S * H * D
        tl.store(dk + o_part + o_kv[:, None] + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_kv)
        tl.store(dv + o_part + o_kv[:, None] + o_d[None, :], b_dv.to(dv.dtype.element_ty), mask=m_kv)


@triton.jit
def _range_sum_splits_kernel(dkp, dvp, dk, dv, T, S, H, HI_BASE, BLOCK, STRIDE, LO_BACK, TILES_PER_SPLIT,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_S: tl.constexpr):
    """dk/dv rows [s0, s0 + BLOCK_S) of key tile i_n: the sum, in split order, of the partials of the
    splits that met some query tile (the others wrote nothing); 0 where none did. Deterministic."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    s0 = i_n * BLOCK_N
    qt_first, qt_end = _query_span(s0, T, S, HI_BASE, BLOCK, STRIDE, LO_BACK, BLOCK_T, BLOCK_N)
    o_s = s0 + tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    o_kv = ((i_b * S + o_s).to(tl.int64) * H + i_h) * D
    m_kv = (o_s < S)[:, None] & (o_d < D)[None, :]
    o_sd = o_kv[:, None] + o_d[None, :]
    split_stride = (tl.num_programs(1) // H).to(tl.int64) * S * H * D
    b_dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    split_end = tl.where(qt_first < qt_end, tl.cdiv(qt_end, TILES_PER_SPLIT), 0)
    for i_split in range(qt_first // TILES_PER_SPLIT, split_end):
        b_dk += tl.load(dkp + i_split * split_stride + o_sd, mask=m_kv, other=0.0)
        b_dv += tl.load(dvp + i_split * split_stride + o_sd, mask=m_kv, other=0.0)
    tl.store(dk + o_sd, b_dk.to(dk.dtype.element_ty), mask=m_kv)
    tl.store(dv + o_sd, b_dv.to(dv.dtype.element_ty), mask=m_kv)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _group_pad(G):
    return triton.next_power_of_2(G)


# Tiles for 16-bit inputs on GPU, chosen on an H100: (BLOCK_M query rows, BLOCK_N keys,
# num_warps, num_stages) per kernel, by head dim (D <= 64 or larger). BLOCK_M is raised to the padded
# group size GP. Each config was compiled for sm_90 (Triton 3.9 ptxas) and checked to fit 227 KiB of
# shared memory; compiled by Triton 3.6 the window's D <= 64 dk/dv step spills a few registers (9 spill
# stores, `scripts/kernel_resources.py`), the others none. A card with less shared memory gets the first
# of `_shrunk` that fits (`utils.fitting`).
# Prefix rules (compressed): long key loops. D <= 64: 32-key tiles took 0.97x the time of 64-key ones at the
# enwik8 model's shape (G = 8, H200, three runs, docs/BENCHMARKS.md, tenth round): 224 registers and no
# spills against 255 and 48 spilled bytes (sm_90, Triton 3.6).
FWD_TILES = {64: (128, 32, 4, 3), 128: (128, 128, 8, 2)}
# Window: ~9 key tiles of 64 per query tile. D <= 64: 8 warps took 0.88x the time of 4 at the enwik8
# model's shape (G = 8) on an H200 (docs/BENCHMARKS.md, sixth round).
FWD_TILES_BANDED = {64: (128, 64, 8, 3), 128: (128, 64, 8, 2)}
# D <= 64 backward: 64 x 64 tiles with 4 warps took 0.69x (compressed) and 0.77x (window) the backward
# time of the former (128, 64, 8, 2) dq and (64, 128, 8, 2) dk/dv tiles at the enwik8 model's shape on
# an H200 (docs/BENCHMARKS.md). D = 128: 8 warps and BLOCK_M 32 for dk/dv, the other choices spill registers
# (G <= 16; fp32 and G = 64 at D=128 still spill some, they fit shared memory).
DQ_TILES = {64: (64, 64, 4, 2), 128: (128, 64, 8, 3)}
# Compressed dk/dv at D <= 64: 32-row query steps took 0.88x the backward time of 64-row ones at the
# enwik8 model's shape (G = 8, H200, docs/BENCHMARKS.md, tenth round); the window keeps 64 (32 took 1.11x).
DKDV_TILES = {64: (32, 64, 4, 2), 128: (32, 128, 8, 3)}
DKDV_TILES_BANDED = {64: (64, 64, 4, 2), 128: (32, 128, 8, 3)}
# Prefix rules (compressed): the first key tiles are seen by every query, so the dk/dv programs' query
# ranges are cut into up to MAX_SPLITS pieces, aiming at SPLIT_PROGRAMS_PER_SM programs per SM so the
# last wave is short; partial sums (fp32, MAX_SPLIT_ELEMENTS at most per buffer) added in a fixed order.
# 16 rather than 32: fewer partials to write and sum, and still a short last wave (compressed backward
# 0.92x the time at the enwik8 model's shape, G = 8, H200; 8 within 1% of 16, 4 slower than 32).
SPLIT_PROGRAMS_PER_SM = 16
MAX_SPLITS = 64
MAX_SPLIT_ELEMENTS = 2**27


def _tiles(G, D, dtype, banded):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) for fwd, dq, dkdv); banded: the window's rule (a lower
    bound inside T), whose tiles differ from the prefix rules'. Small tiles in the interpreter so
    tests at small T still cross several tiles. fp32 (tf32x3 dots keep hi/lo copies) gets half-size tiles
    and no pipelining to stay within an H100's 227 KiB of shared memory at D=128."""
    GP = _group_pad(G)
    if interpreting():
        cfg = ((16, 16, 4, 1),) * 3
    elif dtype == torch.float32:
        cfg = (64, 32, 8, 1), (64, 32, 8, 1), (32, 64, 8, 1)
    else:
        key = 64 if D <= 64 else 128
        fwd, dkdv = (FWD_TILES_BANDED, DKDV_TILES_BANDED) if banded else (FWD_TILES, DKDV_TILES)
        cfg = fwd[key], DQ_TILES[key], dkdv[key]
    return tuple((max(bm, GP), bn, w, st) for bm, bn, w, st in cfg)


def _shrunk(tile, GP):
    """`tile` (BLOCK_M, BLOCK_N, num_warps, num_stages), then ever smaller ones: fewer stages, then half
    the key tile, then half the query tile (never below 16 rows or keys, nor below GP rows)."""
    bm, bn, warps, stages = tile
    out = [(bm, bn, warps, st) for st in range(stages, 0, -1)]
    while bn > 16:
        bn //= 2
        out.append((bm, bn, warps, 1))
    while bm // 2 >= max(16, GP):
        bm //= 2
        out.append((bm, bn, warps, 1))
    return out


def _fit(kernel, args, tile, GP, meta, device, key):
    """Launch keywords of `kernel`: `meta` with the first of `_shrunk(tile)` that fits the device."""
    candidates = [dict(meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st) for bm, bn, w, st in _shrunk(tile, GP)]
    return fitting(kernel, args, candidates, device.index or 0, key)


def _check(q, k, v):
    B, T, HQ, D = q.shape
    H = k.shape[2]
    if HQ % H:
        raise ValueError(f"query heads {HQ} are not a multiple of kv heads {H}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if HQ // H > 64:
        raise ValueError(f"group size {HQ // H} > 64 is not supported")


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def range_attention_fwd(q, k, v, scale, hi_base, block, stride, lo_back):
    _check(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    o = _empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _empty((B, T, HQ), dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    GP = _group_pad(G)
    banded = lo_back < T
    tile, _, _ = _tiles(G, D, q.dtype, banded=banded)
    prec, upcast = dot_precision(q.dtype)
    args = (q, k, v, o, lse, scale * LOG2E, T, S, H, G, hi_base, block, stride, lo_back)
    meta = dict(D=D, BLOCK_D=_block_d(D), GP=GP, PREC=prec, UPCAST=upcast)
    launch = _fit(_range_fwd_kernel, args, tile, GP, meta, q.device, (G, D, q.dtype, banded))
    _range_fwd_kernel[(triton.cdiv(T, launch["BLOCK_M"] // GP), B * H)](*args, **launch)
    return o, lse


def _num_splits(n_programs, n_query_tiles, lo_back, T, kv_numel, device):
    """Split the query range of the dk/dv programs when a prefix rule makes a few key tiles see (almost)
    every query: about SPLIT_PROGRAMS_PER_SM programs per SM, so that no program is long next to the
    whole kernel and the last wave ends nearly together."""
    if lo_back < T:  # banded (window): each key tile sees few query tiles, enough programs already
        return 1
    sms = num_sms(device.index or 0)
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, n_programs)
    return max(1, min(want, n_query_tiles, MAX_SPLITS, MAX_SPLIT_ELEMENTS // max(kv_numel, 1)))


def range_attention_bwd(do, q, k, v, o, lse, dlse, scale, hi_base, block, stride, lo_back):
    """(dq, dk, dv) from the gradients of o (do) and of lse (dlse, None when lse took no part)."""
    q, k, v, o, do = (x.contiguous() for x in (q, k, v, o, do))
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous().float()
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    GP = _group_pad(G)
    dq = _empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or S == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    delta = _empty((B, T, HQ), dtype=torch.float32, device=q.device)
    banded = lo_back < T
    _, dq_tile, dkdv_tile = _tiles(G, D, q.dtype, banded=banded)
    prec, upcast = dot_precision(q.dtype)
    common = dict(D=D, BLOCK_D=_block_d(D), GP=GP, PREC=prec, UPCAST=upcast)
    qk_scale = scale * LOG2E
    rule = (hi_base, block, stride, lo_back)
    key = (G, D, q.dtype, banded)
    args = (q, k, v, o, do, lse, lse if dlse is None else dlse, delta, dq, qk_scale, scale, T, S, H, G, *rule)
    launch = _fit(_range_dq_kernel, args, dq_tile, GP, dict(common, HAS_DLSE=dlse is not None), q.device,
                  key + (dlse is not None,))
    _range_dq_kernel[(triton.cdiv(T, launch["BLOCK_M"] // GP), B * H)](*args, **launch)

    # The dk/dv tile is chosen on the unsplit launch (dk, dv in k's dtype); splitting changes no tile.
    args = (q, k, v, do, lse, delta, k, v, qk_scale, scale, T, S, H, G, *rule, 1)
    launch = _fit(_range_dkdv_kernel, args, dkdv_tile, GP, dict(common, SPLIT=0), q.device, key)
    bm3, bn3 = launch["BLOCK_M"], launch["BLOCK_N"]
    n_key_tiles, n_query_tiles = triton.cdiv(S, bn3), triton.cdiv(T, bm3 // GP)
    splits = _num_splits(n_key_tiles * B * H, n_query_tiles, lo_back, T, k.numel(), q.device)
    tiles_per_split = triton.cdiv(n_query_tiles, splits)
    splits = triton.cdiv(n_query_tiles, tiles_per_split)  # no split left without a query tile
    if splits == 1:
        dk, dv = _empty(k.shape, dtype=k.dtype, device=k.device), _empty(v.shape, dtype=v.dtype, device=v.device)
    else:
        # Only the splits that meet some query tile of a key tile write it, and only those are read.
        dk = _empty((splits, *k.shape), dtype=torch.float32, device=k.device)
        dv = _empty((splits, *v.shape), dtype=torch.float32, device=v.device)
    _range_dkdv_kernel[(n_key_tiles, B * H, splits)](
        q, k, v, do, lse, delta, dk, dv, qk_scale, scale, T, S, H, G, *rule, tiles_per_split,
        **dict(launch, SPLIT=int(splits > 1)))
    if splits > 1:
        dkp, dvp = dk, dv
        dk, dv = _empty(k.shape, dtype=k.dtype, device=k.device), _empty(v.shape, dtype=v.dtype, device=v.device)
        block_s = min(bn3, 32)
        _range_sum_splits_kernel[(n_key_tiles, B * H, bn3 // block_s)](
            dkp, dvp, dk, dv, T, S, H, *rule, tiles_per_split, D=D, BLOCK_D=_block_d(D), BLOCK_T=bm3 // GP,
            BLOCK_N=bn3, BLOCK_S=block_s, num_warps=4)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# torch.library registration, so torch.compile traces through without a graph break
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa::range_attention", mutates_args=())
def _range_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, hi_base: int,
                        block: int, stride: int, lo_back: int) -> tuple[torch.Tensor, torch.Tensor]:
    return range_attention_fwd(q, k, v, scale, hi_base, block, stride, lo_back)


@_range_attention_op.register_fake
def _(q, k, v, scale, hi_base, block, stride, lo_back):
    B, T, HQ, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, T, HQ), dtype=torch.float32)


@torch.library.custom_op("nsa::range_attention_bwd", mutates_args=())
def _range_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, dlse: Optional[torch.Tensor], scale: float, hi_base: int, block: int,
                            stride: int, lo_back: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return range_attention_bwd(do, q, k, v, o, lse, dlse, scale, hi_base, block, stride, lo_back)


@_range_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, scale, hi_base, block, stride, lo_back):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *rule = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.rule = rule
    # An output no loss used gets None rather than zeros: without an lse gradient (the model's top-n
    # reads lse under no_grad) the backward runs exactly as if lse had none.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _range_attention_bwd_op(do, q, k, v, o, lse, dlse, *ctx.rule)
    return dq, dk, dv, None, None, None, None, None


_range_attention_op.register_autograd(_backward, setup_context=_setup_context)


def range_attention(q, k, v, scale, hi_base, block, stride, lo_back):
    """(o [B, T, HQ, D], lse [B, T, HQ] fp32) of attention where query t sees keys [lo(t), hi(t)]
    (module docstring); differentiable in q, k, v through both o and lse, as the reference."""
    return _range_attention_op(q, k, v, float(scale), int(hi_base), int(block), int(stride), int(lo_back))
