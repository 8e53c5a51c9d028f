"""One flash-attention kernel for every branch where query t sees a contiguous key range.

The compressed branch and the sliding window differ only in which keys a query sees, and in both the
visible keys of token t form one interval [lo(t), hi(t)] whose ends never decrease with t:

    hi(t) = hi_base + max(t + hi_off, 0) // hi_div        (clamped to S - 1)
    lo(t) = max(t - lo_back, 0)

- window w:           hi(t) = t,  lo(t) = t - w + 1        (hi_base=0, hi_off=0, hi_div=1, lo_back=w-1)
- compressed (m mem): key r < m is a memory key, always visible; key m + i is compressed block i,
  visible iff i*stride + block - 1 <= t. Both together are the prefix [0, hi(t)] with
  hi(t) = m - 1 + max(t + stride - block + 1, 0) // stride, lo_back = "infinity".

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

import functools
import math
import os

import torch
import triton
import triton.language as tl

# A lower bound no real index reaches; kept well inside int32 so t + NO_LO_BOUND cannot overflow.
NO_LO_BOUND = 2**30

# Output allocator; the tests swap in a NaN-filled one to catch elements a kernel forgets to write.
_empty = torch.empty


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (set in the interpreter only): the interpreter multiplies
    bf16 operands as raw integers, so widen them first; bf16 products are exact in fp32 either way."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _hi(t, HI_BASE, HI_OFF, HI_DIV):
    # max(., 0) first: Triton's integer division truncates, we need floor, and both agree on >= 0.
    return HI_BASE + tl.maximum(t + HI_OFF, 0) // HI_DIV


@triton.jit
def _query_rows(t0, T, G, GP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row r of a query tile is token t0 + r // GP, head r % GP of the group."""
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // GP
    g = r % GP
    return t, g, (t < T) & (g < G)


@triton.jit
def _key_split(t0, t_last, T, S, HI_BASE, HI_OFF, HI_DIV, LO_BACK, BLOCK_N: tl.constexpr):
    """A query tile's key range [start, end) cut into masked head [start, a), unmasked middle [a, b) and
    masked tail [b, end), all tile-aligned from start. A key tile in [a, b) is seen by every token of the
    query tile (its lo bound is <= the tile's first key, its hi bound >= the tile's last key, < S), so
    its scores need no mask; lo and hi never decrease with t, so the tile's last / first token decide."""
    start = (tl.maximum(t0 - LO_BACK, 0) // BLOCK_N) * BLOCK_N
    end = tl.minimum(_hi(t_last, HI_BASE, HI_OFF, HI_DIV), S - 1) + 1
    lo_last = tl.maximum(t_last - LO_BACK, 0)
    hi_first = tl.minimum(_hi(t0, HI_BASE, HI_OFF, HI_DIV), S - 1)  # >= -1
    a = tl.maximum(start, tl.cdiv(lo_last, BLOCK_N) * BLOCK_N)
    b = tl.maximum(a, ((hi_first + 1) // BLOCK_N) * BLOCK_N)
    return start, tl.minimum(a, end), a, b, end


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, kv_base, lo, hi, qk_scale, first, last, S, H, d, d_ok,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """Online-softmax update over key tiles [first, last); MASK: apply the per-row interval (else every
    key of these tiles is visible to every row)."""
    for s0 in range(first, last, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        kv_off = kv_base + s.to(tl.int64) * (H * D)
        if MASK:
            kv_mask = (s < S)[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(K + kv_off[:, None] + d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(V + kv_off[:, None] + d[None, :], mask=d_ok[None, :], other=0.0)
        qk = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # log2 units
        if MASK:
            visible = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every row sees a key here
            m_safe = m_new
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _range_fwd_kernel(Q, K, V, O, LSE, qk_scale, T, S, H, G, HI_BASE, HI_OFF, HI_DIV, LO_BACK,
                D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    # Last query tiles first: they see the most keys, so the long programs start in the first wave.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HQ = H * G
    t0 = pid_m * BLOCK_T
    t, g, row_ok = _query_rows(t0, T, G, GP, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_off = ((b * T + t).to(tl.int64) * HQ + h * G + g) * D
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    lo = tl.maximum(t - LO_BACK, 0)
    hi = tl.minimum(_hi(t, HI_BASE, HI_OFF, HI_DIV), S - 1)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    start, head_end, a, b_mid, end = _key_split(t0, t_last, T, S, HI_BASE, HI_OFF, HI_DIV, LO_BACK, BLOCK_N)
    kv_base = (b.to(tl.int64) * S * H + h) * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, kv_base, lo, hi, qk_scale, start, head_end, S, H, d, d_ok,
                               D, BLOCK_N, True, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, kv_base, lo, hi, qk_scale, a, b_mid, S, H, d, d_ok,
                               D, BLOCK_N, False, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, kv_base, lo, hi, qk_scale, b_mid, end, S, H, d, d_ok,
                               D, BLOCK_N, True, PREC, UPCAST)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + q_off[:, None] + d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + (b * T + t).to(tl.int64) * HQ + h * G + g, lse, mask=row_ok)


@triton.jit
def _load_lse2(LSE, lse_off, row_ok):
    """lse in log2 units, +inf for padded rows and rows that saw no key, so their p = exp2(s - lse) = 0."""
    lse = tl.load(LSE + lse_off, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K, V, kv_base, lo, hi, qk_scale, first, last, S, H, d, d_ok,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    for s0 in range(first, last, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        kv_off = kv_base + s.to(tl.int64) * (H * D)
        if MASK:
            kv_mask = (s < S)[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), PREC, UPCAST)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            visible = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    return dq


@triton.jit
def _range_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, qk_scale, scale, T, S, H, G,
                   HI_BASE, HI_OFF, HI_DIV, LO_BACK,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest programs first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HQ = H * G
    t0 = pid_m * BLOCK_T
    t, g, row_ok = _query_rows(t0, T, G, GP, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    row_off = (b * T + t).to(tl.int64) * HQ + h * G + g
    q_off = row_off * D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + q_off[:, None] + d[None, :], mask=qd_mask, other=0.0)
    o = tl.load(O + q_off[:, None] + d[None, :], mask=qd_mask, other=0.0)
    # delta = rowsum(o * do), the softmax backward's correction; stored for the dk/dv kernel.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_off, delta, mask=row_ok)
    # +inf for padded rows and rows that see no key: their p is 0 with or without the mask.
    lse2 = _load_lse2(LSE, row_off, row_ok)

    lo = tl.maximum(t - LO_BACK, 0)
    hi = tl.minimum(_hi(t, HI_BASE, HI_OFF, HI_DIV), S - 1)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    start, head_end, a, b_mid, end = _key_split(t0, t_last, T, S, HI_BASE, HI_OFF, HI_DIV, LO_BACK, BLOCK_N)
    kv_base = (b.to(tl.int64) * S * H + h) * D

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, kv_base, lo, hi, qk_scale, start, head_end, S, H, d, d_ok,
                   D, BLOCK_N, True, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, kv_base, lo, hi, qk_scale, a, b_mid, S, H, d, d_ok,
                   D, BLOCK_N, False, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, kv_base, lo, hi, qk_scale, b_mid, end, S, H, d, d_ok,
                   D, BLOCK_N, True, PREC, UPCAST)
    tl.store(DQ + q_off[:, None] + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _query_span(s0, T, S, HI_BASE, HI_OFF, HI_DIV, LO_BACK, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles [m_first, m_end) that see some key of the key tile [s0, s0 + BLOCK_N): hi(t) >= s0
    (invert hi) and lo(t) <= the tile's last key."""
    s_last = tl.minimum(s0 + BLOCK_N - 1, S - 1)
    t_first = tl.where(s0 <= _hi(0, HI_BASE, HI_OFF, HI_DIV), 0, (s0 - HI_BASE) * HI_DIV - HI_OFF)
    t_end = tl.minimum(s_last + LO_BACK, T - 1) + 1
    return t_first // BLOCK_T, tl.cdiv(t_end, BLOCK_T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, s, first, last, b, T, H, G, HI_BASE, HI_OFF, HI_DIV, LO_BACK,
                qk_scale, d, d_ok, D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    HQ = H * G
    h = (tl.program_id(1) % H)
    for mt in range(first, last):
        t, g, row_ok = _query_rows(mt * BLOCK_T, T, G, GP, BLOCK_M)
        row_off = (b * T + t).to(tl.int64) * HQ + h * G + g
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + row_off[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + row_off[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        # +inf for padded rows and rows that see no key: p = 0 for them even without the mask.
        lse2 = _load_lse2(LSE, row_off, row_ok)
        delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M], so dk and dv come out of plain dots.
        qk_t = _dot(k, tl.trans(q), PREC, UPCAST)
        p_t = tl.exp2(qk_t * qk_scale - lse2[None, :])
        if MASK:
            lo = tl.maximum(t - LO_BACK, 0)
            hi = _hi(t, HI_BASE, HI_OFF, HI_DIV)
            visible = (s[:, None] >= lo[None, :]) & (s[:, None] <= hi[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, PREC, UPCAST)
        dp_t = _dot(v, tl.trans(do), PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PREC, UPCAST)
    return dk, dv


@triton.jit
def _range_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, scale, T, S, H, G,
                     HI_BASE, HI_OFF, HI_DIV, LO_BACK, TILES_PER_SPLIT,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    s0 = pid_n * BLOCK_N
    s = s0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_off = ((b * S + s).to(tl.int64) * H + h) * D
    kv_mask = (s < S)[:, None] & d_ok[None, :]

    m_first, m_end = _query_span(s0, T, S, HI_BASE, HI_OFF, HI_DIV, LO_BACK, BLOCK_T, BLOCK_N)
    m_first = tl.maximum(m_first, split * TILES_PER_SPLIT)
    m_end = tl.minimum(m_end, (split + 1) * TILES_PER_SPLIT)
    # With SPLIT, DK/DV are fp32 partial buffers [SPLIT, B, S, H, D] of which `_range_sum_splits_kernel` reads
    # only the splits with some query tile: an empty one writes nothing.
    if (m_first < m_end) | (SPLIT == 0):
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        # Query tiles that see the whole key tile (every row: lo(t) <= s0, hi(t) >= its last key, and keys
        # >= S, which only the last tile has, are never stored) need no mask: the middle [a, c).
        s_last = tl.minimum(s0 + BLOCK_N - 1, S - 1)
        t_full = tl.where(s_last <= _hi(0, HI_BASE, HI_OFF, HI_DIV), 0, (s_last - HI_BASE) * HI_DIV - HI_OFF)
        a = tl.maximum(m_first, tl.cdiv(t_full, BLOCK_T))
        c = tl.maximum(a, tl.minimum((s0 + LO_BACK + 1) // BLOCK_T, m_end))
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, s, m_first, tl.minimum(a, m_end), b, T, H, G,
                             HI_BASE, HI_OFF, HI_DIV, LO_BACK, qk_scale, d, d_ok, D, GP, BLOCK_M, True, PREC, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, s, a, c, b, T, H, G,
                             HI_BASE, HI_OFF, HI_DIV, LO_BACK, qk_scale, d, d_ok, D, GP, BLOCK_M, False, PREC, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, s, c, m_end, b, T, H, G,
                             HI_BASE, HI_OFF, HI_DIV, LO_BACK, qk_scale, d, d_ok, D, GP, BLOCK_M, True, PREC, UPCAST)
        part = split.to(tl.int64) * (tl.num_programs(1) // H) * S * H * D
        tl.store(DK + part + kv_off[:, None] + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + part + kv_off[:, None] + d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _range_sum_splits_kernel(DKP, DVP, DK, DV, T, S, H, HI_BASE, HI_OFF, HI_DIV, LO_BACK, TILES_PER_SPLIT,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    """DK/DV rows [s0, s0 + BLOCK_S) of key tile pid_n: the sum, in split order, of the partials of the
    splits that met some query tile (the others wrote nothing); 0 where none did. Deterministic."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile0 = pid_n * BLOCK_N
    m_first, m_end = _query_span(tile0, T, S, HI_BASE, HI_OFF, HI_DIV, LO_BACK, BLOCK_T, BLOCK_N)
    s = tile0 + tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    off = ((b * S + s).to(tl.int64) * H + h) * D
    mask = (s < S)[:, None] & (d < D)[None, :]
    ptr = off[:, None] + d[None, :]
    stride = (tl.num_programs(1) // H).to(tl.int64) * S * H * D
    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    c_end = tl.where(m_first < m_end, tl.cdiv(m_end, TILES_PER_SPLIT), 0)
    for c in range(m_first // TILES_PER_SPLIT, c_end):
        dk += tl.load(DKP + c * stride + ptr, mask=mask, other=0.0)
        dv += tl.load(DVP + c * stride + ptr, mask=mask, other=0.0)
    tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _precision(dtype):
    # fp32 inputs: tf32x3 keeps about fp32 accuracy on tensor cores (plain tf32 would lose ~3 digits).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _group_pad(G):
    return triton.next_power_of_2(G)


@functools.cache
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Tiles for 16-bit inputs on GPU, chosen on an H100: (BLOCK_M query rows, BLOCK_N keys,
# num_warps, num_stages) per kernel, by head dim (D <= 64 or larger). BLOCK_M is raised to the padded
# group size GP. Each config was compiled for sm_90 (Triton 3.9 ptxas) and checked to fit 227 KiB of
# shared memory with no register spill.
FWD_TILES = {64: (128, 64, 4, 3), 128: (128, 128, 8, 2)}  # prefix rules (compressed): long key loops
FWD_TILES_BANDED = {64: (128, 64, 4, 3), 128: (128, 64, 8, 2)}  # window: ~9 key tiles of 64 per query tile
DQ_TILES = {64: (128, 64, 8, 2), 128: (128, 64, 8, 3)}
# 8 warps everywhere in the backward and BLOCK_M 32 for dk/dv at D=128: the other choices spill registers
# (G <= 16; fp32 and G = 64 at D=128 still spill some, they fit shared memory).
DKDV_TILES = {64: (64, 128, 8, 2), 128: (32, 128, 8, 3)}
# Prefix rules (compressed): the first key tiles are seen by every query, so the dk/dv programs' query
# ranges are cut into up to MAX_SPLITS pieces, aiming at SPLIT_PROGRAMS_PER_SM programs per SM so the
# last wave is short; partial sums (fp32, MAX_SPLIT_ELEMENTS at most per buffer) added in a fixed order.
SPLIT_PROGRAMS_PER_SM = 32
MAX_SPLITS = 64
MAX_SPLIT_ELEMENTS = 2**27


def _tiles(G, D, dtype, banded=False):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) for fwd, dq, dkdv). Small tiles in the interpreter so
    tests at small T still cross several tiles. fp32 (tf32x3 dots keep hi/lo copies) gets half-size tiles
    and no pipelining to stay within an H100's 227 KiB of shared memory at D=128."""
    GP = _group_pad(G)
    if _interpreting():
        cfg = ((16, 16, 4, 1),) * 3
    elif dtype == torch.float32:
        cfg = (64, 32, 8, 1), (64, 32, 8, 1), (32, 64, 8, 1)
    else:
        key = 64 if D <= 64 else 128
        cfg = (FWD_TILES_BANDED if banded else FWD_TILES)[key], DQ_TILES[key], DKDV_TILES[key]
    return tuple((max(bm, GP), bn, w, st) for bm, bn, w, st in cfg)


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


def range_attention_fwd(q, k, v, scale, hi_base, hi_off, hi_div, lo_back):
    _check(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    o = _empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _empty((B, T, HQ), dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    (bm, bn, warps, stages), _, _ = _tiles(G, D, q.dtype, banded=lo_back < T)
    grid = (triton.cdiv(T, bm // _group_pad(G)), B * H)
    _range_fwd_kernel[grid](q, k, v, o, lse, scale * math.log2(math.e), T, S, H, G, hi_base, hi_off, hi_div, lo_back,
                      D=D, BLOCK_D=_block_d(D), GP=_group_pad(G), BLOCK_M=bm, BLOCK_N=bn,
                      PREC=_precision(q.dtype), UPCAST=_interpreting(),
                      num_warps=warps, num_stages=stages)
    return o, lse


def _num_splits(n_programs, n_query_tiles, lo_back, T, kv_numel, device):
    """Split the query range of the dk/dv programs when a prefix rule makes a few key tiles see (almost)
    every query: about SPLIT_PROGRAMS_PER_SM programs per SM, so that no program is long next to the
    whole kernel and the last wave ends nearly together."""
    if lo_back < T:  # banded (window): each key tile sees few query tiles, enough programs already
        return 1
    sms = 2 if _interpreting() else _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, n_programs)
    return max(1, min(want, n_query_tiles, MAX_SPLITS, MAX_SPLIT_ELEMENTS // max(kv_numel, 1)))


def range_attention_bwd(do, q, k, v, o, lse, scale, hi_base, hi_off, hi_div, lo_back):
    q, k, v, o, do = (x.contiguous() for x in (q, k, v, o, do))
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    GP = _group_pad(G)
    dq = _empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or S == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    delta = _empty((B, T, HQ), dtype=torch.float32, device=q.device)
    (bm, bn, warps, stages), (bm2, bn2, warps2, stages2), (bm3, bn3, warps3, stages3) = _tiles(G, D, q.dtype)
    common = dict(D=D, BLOCK_D=_block_d(D), GP=GP, PREC=_precision(q.dtype), UPCAST=_interpreting())
    qk_scale = scale * math.log2(math.e)
    rule = (hi_base, hi_off, hi_div, lo_back)
    _range_dq_kernel[(triton.cdiv(T, bm2 // GP), B * H)](
        q, k, v, o, do, lse, delta, dq, qk_scale, scale, T, S, H, G, *rule,
        BLOCK_M=bm2, BLOCK_N=bn2, num_warps=warps2, num_stages=stages2, **common)

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
        BLOCK_M=bm3, BLOCK_N=bn3, SPLIT=int(splits > 1), num_warps=warps3, num_stages=stages3, **common)
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
                        hi_off: int, hi_div: int, lo_back: int) -> tuple[torch.Tensor, torch.Tensor]:
    return range_attention_fwd(q, k, v, scale, hi_base, hi_off, hi_div, lo_back)


@_range_attention_op.register_fake
def _(q, k, v, scale, hi_base, hi_off, hi_div, lo_back):
    B, T, HQ, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, T, HQ), dtype=torch.float32)


@torch.library.custom_op("nsa::range_attention_bwd", mutates_args=())
def _range_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, scale: float, hi_base: int, hi_off: int, hi_div: int,
                            lo_back: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return range_attention_bwd(do, q, k, v, o, lse, scale, hi_base, hi_off, hi_div, lo_back)


@_range_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, hi_base, hi_off, hi_div, lo_back):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *rule = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.rule = rule


def _backward(ctx, do, dlse):
    # lse is a statistic for the top-n pass, which runs under no_grad: no gradient flows through it.
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _range_attention_bwd_op(do, q, k, v, o, lse, *ctx.rule)
    return dq, dk, dv, None, None, None, None, None


_range_attention_op.register_autograd(_backward, setup_context=_setup_context)


def range_attention(q, k, v, scale, hi_base, hi_off, hi_div, lo_back):
    """(o [B, T, HQ, D], lse [B, T, HQ] fp32) of attention where query t sees keys [lo(t), hi(t)]
    (module docstring); differentiable in q, k, v."""
    return _range_attention_op(q, k, v, float(scale), int(hi_base), int(hi_off), int(hi_div), int(lo_back))
