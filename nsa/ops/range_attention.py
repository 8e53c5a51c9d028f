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
the prefix rule the first key tiles are seen by every query, so there the query range may be split
over several programs that write fp32 partial sums, added afterwards in a fixed order: deterministic.

`range_attention_reference` below is the plain PyTorch twin of the kernels.
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


def range_attention_reference(q, k, v, scale, hi_base, hi_off, hi_div, lo_back):
    """PyTorch twin of the kernels: the same interval rule as a dense mask, then masked attention."""
    from nsa.ops.reference import attend

    T, S = q.shape[1], k.shape[1]
    t = torch.arange(T, device=q.device)[:, None]
    s = torch.arange(S, device=q.device)[None, :]
    hi = hi_base + (t + hi_off).clamp_min(0) // hi_div
    lo = (t - lo_back).clamp_min(0)
    return attend(q, k, v, ((s >= lo) & (s <= hi))[None, None, None], scale)


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
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, T, S, H, G, HI_BASE, HI_OFF, HI_DIV, LO_BACK,
                D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_m = tl.program_id(0)
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
    # The tile's key span: lo and hi never decrease with t.
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    start = (tl.maximum(t0 - LO_BACK, 0) // BLOCK_N) * BLOCK_N
    end = tl.minimum(_hi(t_last, HI_BASE, HI_OFF, HI_DIV), S - 1) + 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        kv_off = ((b * S + s).to(tl.int64) * H + h) * D
        kv_mask = (s < S)[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # log2 units
        visible = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

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
def _bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, qk_scale, scale, T, S, H, G,
                   HI_BASE, HI_OFF, HI_DIV, LO_BACK,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_m = tl.program_id(0)
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
    lse2 = _load_lse2(LSE, row_off, row_ok)

    lo = tl.maximum(t - LO_BACK, 0)
    hi = tl.minimum(_hi(t, HI_BASE, HI_OFF, HI_DIV), S - 1)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    start = (tl.maximum(t0 - LO_BACK, 0) // BLOCK_N) * BLOCK_N
    end = tl.minimum(_hi(t_last, HI_BASE, HI_OFF, HI_DIV), S - 1) + 1

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        kv_off = ((b * S + s).to(tl.int64) * H + h) * D
        kv_mask = (s < S)[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        visible = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi[:, None])
        p = tl.where(visible, tl.exp2(qk - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    tl.store(DQ + q_off[:, None] + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, scale, T, S, H, G,
                     HI_BASE, HI_OFF, HI_DIV, LO_BACK, TILES_PER_SPLIT,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    HQ = H * G
    s0 = pid_n * BLOCK_N
    s = s0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_off = ((b * S + s).to(tl.int64) * H + h) * D
    kv_mask = (s < S)[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)

    # Queries that see some key of [s0, s_last]: hi(t) >= s0 (invert hi) and lo(t) <= s_last.
    s_last = tl.minimum(s0 + BLOCK_N - 1, S - 1)
    u = s0 - HI_BASE
    t_first = tl.where(s0 <= _hi(0, HI_BASE, HI_OFF, HI_DIV), 0, u * HI_DIV - HI_OFF)
    t_end = tl.minimum(s_last + LO_BACK, T - 1) + 1
    m_first = tl.maximum(t_first // BLOCK_T, split * TILES_PER_SPLIT)
    m_end = tl.minimum(tl.cdiv(t_end, BLOCK_T), (split + 1) * TILES_PER_SPLIT)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for mt in range(m_first, m_end):
        t, g, row_ok = _query_rows(mt * BLOCK_T, T, G, GP, BLOCK_M)
        row_off = (b * T + t).to(tl.int64) * HQ + h * G + g
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + row_off[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + row_off[:, None] * D + d[None, :], mask=qd_mask, other=0.0)
        lse2 = _load_lse2(LSE, row_off, row_ok)
        delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
        lo = tl.maximum(t - LO_BACK, 0)
        hi = _hi(t, HI_BASE, HI_OFF, HI_DIV)
        # Transposed scores [BLOCK_N, BLOCK_M], so dk and dv come out of plain dots.
        qk_t = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale
        visible = (s[:, None] >= lo[None, :]) & (s[:, None] <= hi[None, :])
        p_t = tl.where(visible, tl.exp2(qk_t - lse2[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, PREC, UPCAST)
        dp_t = _dot(v, tl.trans(do), PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PREC, UPCAST)

    # With several splits DK/DV are fp32 partial buffers [SPLIT, B, S, H, D].
    part = split.to(tl.int64) * (tl.num_programs(1) // H) * S * H * D
    tl.store(DK + part + kv_off[:, None] + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + part + kv_off[:, None] + d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


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


def _tiles(G, D, dtype):
    """(BLOCK_M fwd/dq, BLOCK_N fwd/dq, BLOCK_M dkdv, BLOCK_N dkdv, num_warps, num_stages). Small tiles in
    the interpreter so tests at small T still cross several tiles. fp32 (tf32x3 dots keep hi/lo copies)
    gets half-size tiles and no pipelining to stay within an H100's 227 KiB of shared memory at D=128."""
    GP = _group_pad(G)
    if _interpreting():
        return max(16, GP), 16, max(16, GP), 16, 4, 1
    if dtype == torch.float32:
        return max(64, GP), 32, max(32, GP), 64, 8, 1
    if D <= 64:
        return max(128, GP), 64, max(64, GP), 128, 4, 2
    return max(128, GP), 64, max(64, GP), 128, 8, 2


def _check(q, k, v):
    B, T, HQ, D = q.shape
    H = k.shape[2]
    if HQ % H:
        raise ValueError(f"query heads {HQ} are not a multiple of kv heads {H}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if HQ // H > 64:
        raise ValueError(f"group size {HQ // H} > 64 is not supported")


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
    bm, bn, _, _, warps, stages = _tiles(G, D, q.dtype)
    grid = (triton.cdiv(T, bm // _group_pad(G)), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, scale * math.log2(math.e), T, S, H, G, hi_base, hi_off, hi_div, lo_back,
                      D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GP=_group_pad(G), BLOCK_M=bm, BLOCK_N=bn,
                      PREC=_precision(q.dtype), UPCAST=_interpreting(), num_warps=warps, num_stages=stages)
    return o, lse


def _num_splits(n_programs, n_query_tiles, lo_back, T, device):
    """Split the query range of the dk/dv programs when a prefix rule leaves too few of them busy."""
    if lo_back < T:  # banded (window): each key tile sees few query tiles, enough programs already
        return 1
    sms = 2 if _interpreting() else _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(2 * sms, n_programs), n_query_tiles, 16))


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
    bm, bn, bm2, bn2, warps, stages = _tiles(G, D, q.dtype)
    common = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GP=GP, PREC=_precision(q.dtype),
                  UPCAST=_interpreting(), num_warps=warps, num_stages=stages)
    qk_scale = scale * math.log2(math.e)
    _bwd_dq_kernel[(triton.cdiv(T, bm // GP), B * H)](
        q, k, v, o, do, lse, delta, dq, qk_scale, scale, T, S, H, G, hi_base, hi_off, hi_div, lo_back,
        BLOCK_M=bm, BLOCK_N=bn, **common)

    n_key_tiles, n_query_tiles = triton.cdiv(S, bn2), triton.cdiv(T, bm2 // GP)
    splits = _num_splits(n_key_tiles * B * H, n_query_tiles, lo_back, T, q.device)
    if splits == 1:
        dk, dv = _empty(k.shape, dtype=k.dtype, device=k.device), _empty(v.shape, dtype=v.dtype, device=v.device)
    else:
        dk = _empty((splits, *k.shape), dtype=torch.float32, device=k.device)
        dv = _empty((splits, *v.shape), dtype=torch.float32, device=v.device)
    _bwd_dkdv_kernel[(n_key_tiles, B * H, splits)](
        q, k, v, do, lse, delta, dk, dv, qk_scale, scale, T, S, H, G, hi_base, hi_off, hi_div, lo_back,
        triton.cdiv(n_query_tiles, splits), BLOCK_M=bm2, BLOCK_N=bn2, **common)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
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
