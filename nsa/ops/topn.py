"""Streaming top-n selection blocks: block importance and top-n in one Triton pass.

Reference twin: `nsa.ops.reference.topn_blocks` (= `block_importance` + `select_blocks`). The
importance matrix [T, N_s] is never stored: each program owns one kv head and a tile of query rows
(tokens x the G heads of the group, as in `nsa.ops.range_attention`) and walks the selection blocks
in chunks of BJ, keeping a running top-W per row in registers (W = max(BJ, n) rounded to a power of
two; only the first n count). For the chunk [j0, j0 + BJ):

1. recompute p = exp2(q . ck * scale * log2(e) - lse * log2(e)) for the compressed blocks starting in
   the chunk's selection blocks, laid out as [BJ, PSP] (selection block x position r < l'/d inside
   it; PSP = l'/d rounded up to a power of two, padding masked), memory keys excluded, invisible 0;
2. if shared, sum over the G heads of the group (rows are [tokens, GP]: a reshape and a sum);
3. map onto selection blocks by overlap. A compressed block at position r of selection block j
   covers stride-chunks [r, r + l/d) relative to j's first chunk, so it adds p * w_k(r) to block
   j + k, w_k(r) = |[r, r + l/d) & [k l'/d, (k + 1) l'/d)| (= `reference.overlap_matrix`). Per chunk:
   A[k, j] = sum_r w_k(r) p[j, r] (k < K = 1 + ceil((l/d - 1) / (l'/d))), then plane k is rotated by
   k along j (tl.gather); columns j >= k take the rotated current plane, columns j < k the rotated
   plane of the previous chunk (its spill into this chunk): importance = sum over k. For l=32, d=16,
   l'=64 that is weights 1,2,2,2 onto j and 1 onto j+1, no matmul;
4. pack each candidate into one int64 key, larger = better:
       key = (fp32 bits of importance + 1) << 32  -  1 - j
   (importance >= 0, so its bit pattern orders like an integer; the low word 2^32 - 1 - j breaks ties
   to the lower index). Forced blocks get +inf's bits, invalid blocks (j > t // l', padding) key -1,
   below every valid key;
5. merge with sorting networks (`_bitonic`): sort the chunk's keys ascending, take the elementwise
   max with the running keys (sorted descending): that holds the top W of both as a bitonic
   sequence, which log2(W) half-cleaner steps sort descending again. No data-dependent loop.

At the end the first n keys (those >= 0) are decoded to block indices, sorted ascending, padded -1.
Order is (importance descending, index ascending) in both the kernel and the reference, so exact ties
resolve to the lower block index in both; importance values themselves may differ from the
reference's by rounding (summation order), which can flip blocks whose importances are within
rounding of each other.
"""

import torch
import triton
import triton.language as tl

from nsa.ops.range_attention import _query_rows
from nsa.ops.utils import LOG2E, LOG2E_C, dot, dot_precision, fitting, interpreting, num_visible_blocks

# Larger than any block index: the decoded index of an unused slot, sorted last and written as -1.
BIG: tl.constexpr = tl.constexpr(2**30)
# fp32 bit pattern of +inf: the importance bits of a forced block.
INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)

# Output allocator; the tests swap in a poisoned one to catch elements the kernel forgets to write.
_empty = torch.empty


@triton.jit
def _half_clean(b_x, R: tl.constexpr, W: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr,
                LOG_W: tl.constexpr, DESC: tl.constexpr):
    """One half-cleaner step of `_bitonic` at merge level M, comparing elements HALF apart. Its own
    function so that HALF and A are fresh constexprs per step: Triton 3.6 turns a plain assignment of
    an int into a tensor and refuses to re-assign an annotated constexpr in an unrolled loop."""
    A: tl.constexpr = W // (2 * HALF)
    b_y = tl.reshape(b_x, [R, A, 2, HALF])
    # Run of 2^M this pair belongs to; even runs go in the final direction, odd ones reversed.
    if M == LOG_W:
        m_desc = tl.full([1, A, 1, 1], DESC, tl.int1)
    else:
        o_odd = ((tl.arange(0, A)[None, :, None, None] * (2 * HALF)) >> M) & 1
        if DESC:
            m_desc = o_odd == 0
        else:
            m_desc = o_odd == 1
    m_first = tl.arange(0, 2)[None, None, :, None] == 0
    b_y = tl.where(m_first == m_desc, tl.max(b_y, 2, keep_dims=True), tl.min(b_y, 2, keep_dims=True))
    return tl.reshape(b_y, [R, W])


@triton.jit
def _bitonic(b_x, R: tl.constexpr, W: tl.constexpr, FIRST: tl.constexpr, LOG_W: tl.constexpr,
             DESC: tl.constexpr):
    """Bitonic sorting network on each row of a [R, W] tile, merge levels FIRST .. LOG_W: FIRST = 1
    sorts arbitrary rows, FIRST = LOG_W only merges rows that are already bitonic. Level m makes
    runs of 2^m sorted, alternating direction so that level m + 1 sees bitonic runs; the last level
    sorts whole rows descending if DESC else ascending. Each step is a half-cleaner: reshape to
    [R, pairs, 2, HALF] and put the max / min of each pair first. Own network rather than tl.sort:
    the same work on the GPU, and max/min reductions are fast in the interpreter."""
    for i_m in tl.static_range(FIRST, LOG_W + 1):
        for i_s in tl.static_range(i_m):
            b_x = _half_clean(b_x, R, W, i_m, 1 << (i_m - 1 - i_s), LOG_W, DESC)
    return b_x


# Lengths unspecialised, as the range forward: a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["T", "NUM_CMP"])
def _topn_kernel(q, ck, lse, out, qk_scale, T, H, G, NUM_CMP, NUM_MEM, BLOCK, STRIDE, SEL_BLOCK,
                 NUM_INITIAL, NUM_LOCAL,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                 PER_CMP: tl.constexpr, PER_SEL: tl.constexpr, PSP: tl.constexpr, KP: tl.constexpr,
                 BJ: tl.constexpr, W: tl.constexpr, LOG_W: tl.constexpr, LOG_WIDEN: tl.constexpr,
                 N_SEL: tl.constexpr, ROWS: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    BLOCK_C: tl.constexpr = BJ * PSP
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    HQ = H * G
    S = NUM_MEM + NUM_CMP
    t0 = i_m * BLOCK_T
    o_t, o_g, m_row = _query_rows(t0, T, G, GP, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_row = (i_b * T + o_t).to(tl.int64) * HQ + i_h * G + o_g
    b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_row[:, None] & m_d[None, :], other=0.0)
    b_lse2 = tl.load(lse + o_row, mask=m_row, other=0.0) * LOG2E_C
    # Compressed block i is visible to token t iff i < o_nvis(t) (its last token is <= t).
    o_nvis = num_visible_blocks(o_t, BLOCK, STRIDE)

    # Rows of the running top-n: one per token if shared (heads summed), else one per (token, head).
    if SHARED:
        o_tr = t0 + tl.arange(0, ROWS)
    else:
        o_tr = o_t
    o_cur = o_tr // SEL_BLOCK

    # Tile column c is compressed block (j0 + c // PSP) * PER_SEL + c % PSP (masked if c % PSP >= PER_SEL).
    o_c = tl.arange(0, BLOCK_C)
    o_csel = o_c // PSP
    o_cpos = o_c % PSP
    # Overlap weights w_k(r) [KP, PSP] and the rotation by k of plane k along the selection blocks.
    o_k = tl.arange(0, KP)[:, None]
    o_r = tl.arange(0, PSP)[None, :]
    b_w = tl.minimum(o_r + PER_CMP, (o_k + 1) * PER_SEL) - tl.maximum(o_r, o_k * PER_SEL)
    b_w = tl.where(o_r < PER_SEL, tl.maximum(b_w, 0), 0).to(tl.float32)
    o_k3 = tl.arange(0, KP)[None, :, None]
    o_j3 = tl.arange(0, BJ)[None, None, :]
    o_rot = ((o_j3 - o_k3) & (BJ - 1)) + tl.zeros([ROWS, KP, BJ], tl.int32)
    o_j = tl.arange(0, BJ)

    b_spill = tl.zeros([ROWS, KP, BJ], tl.float32)
    b_top = tl.full([ROWS, W], -1, tl.int64)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    for i_j0 in range(0, t_last // SEL_BLOCK + 1, BJ):
        # 1. probabilities of the compressed blocks that start in this chunk's selection blocks
        o_i = (i_j0 + o_csel) * PER_SEL + o_cpos
        m_i = (o_cpos < PER_SEL) & (o_i < NUM_CMP)
        o_ck = ((i_b * S + NUM_MEM + o_i).to(tl.int64) * H + i_h) * D
        b_ck = tl.load(ck + o_ck[:, None] + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0.0)
        b_s = dot(b_q, tl.trans(b_ck), PREC, UPCAST)
        m_vis = m_row[:, None] & m_i[None, :] & (o_i[None, :] < o_nvis[:, None])
        b_p = tl.where(m_vis, tl.exp2(b_s * qk_scale - b_lse2[:, None]), 0.0)
        # 2. group sum
        if SHARED:
            b_p3 = tl.sum(tl.reshape(b_p, [BLOCK_T, GP, BJ, PSP]), 1)
        else:
            b_p3 = tl.reshape(b_p, [BLOCK_M, BJ, PSP])
        # 3. overlap: plane k goes k selection blocks ahead; the previous chunk's rotated planes
        #    supply the columns j < k
        b_a = tl.sum(b_p3[:, None, :, :] * b_w[None, :, None, :], 3)
        if KP > 1:
            b_a = tl.gather(b_a, o_rot, 2)
        b_imp = tl.sum(tl.where(o_j3 >= o_k3, b_a, b_spill), 1)
        b_spill = b_a
        # 4. keys
        o_jj = i_j0 + o_j
        m_valid = o_jj[None, :] <= o_cur[:, None]
        m_forced = (o_jj[None, :] < NUM_INITIAL) | (o_cur[:, None] - o_jj[None, :] < NUM_LOCAL)
        b_bits = tl.maximum(b_imp.to(tl.int32, bitcast=True), 0)  # importance >= 0 (-0.0 -> +0.0)
        b_bits = tl.where(m_forced, INF_BITS, b_bits)
        b_key = ((b_bits.to(tl.int64) + 1) << 32) - 1 - o_jj[None, :]
        b_key = tl.where(m_valid, b_key, -1)
        for i_e in tl.static_range(LOG_WIDEN):  # n > BJ: pad the chunk to W with empty keys
            b_key = tl.reshape(tl.join(b_key, tl.full([ROWS, BJ << i_e], -1, tl.int64)), [ROWS, BJ << (i_e + 1)])
        # 5. merge: max(descending, ascending) is the top W of both, bitonic
        b_asc = _bitonic(b_key, ROWS, W, 1, LOG_W, False)
        b_top = _bitonic(tl.maximum(b_top, b_asc), ROWS, W, LOG_W, LOG_W, True)

    # Ascending indices of the first n keys; empty slots (key -1) sort last and are written -1.
    o_col = tl.arange(0, W)[None, :]
    b_sel = tl.where((o_col < N_SEL) & (b_top >= 0), (-1 - b_top).to(tl.int32), BIG)
    b_sel = _bitonic(b_sel, ROWS, W, 1, LOG_W, False)
    b_sel = tl.where(b_sel >= BIG, -1, b_sel)
    if SHARED:
        o_out = (i_b * T + o_tr).to(tl.int64) * H + i_h
        m_out = o_tr < T
    else:
        o_out = o_row
        m_out = m_row
    tl.store(out + o_out[:, None] * N_SEL + o_col, b_sel, mask=m_out[:, None] & (o_col < N_SEL))


def _tiles(G, per_sel, dtype):
    """(BLOCK_M, BJ, num_warps, num_stages): about 128 query rows (64 for fp32) and 64 compressed keys
    per step, chosen on an H100; small in the interpreter."""
    GP = triton.next_power_of_2(G)
    if interpreting():
        return max(16, GP), 16, 4, 1
    bj = max(16, triton.next_power_of_2(triton.cdiv(64, per_sel)))
    if dtype == torch.float32:
        return max(64, GP), bj, 4, 1
    return max(128, GP), bj, 8, 2


def _kernel_metas(G, D, dtype, block, stride, sel_block, num_selected, shared):
    """The constexprs and launch options of `_topn_kernel`: the H100 choice of `_tiles`, then fewer
    stages and fewer query rows for a card with less shared memory (`utils.fitting`)."""
    per_cmp, per_sel = block // stride, sel_block // stride
    bm, bj, warps, stages = _tiles(G, per_sel, dtype)
    GP = triton.next_power_of_2(G)
    tiles = [(bm, st) for st in range(stages, 0, -1)]
    while bm // 2 >= max(16, 2 * GP if shared else GP):  # shared: at least 2 tokens per tile
        bm //= 2
        tiles.append((bm, 1))
    return [_kernel_meta(G, D, dtype, per_cmp, per_sel, bj, num_selected, shared, bm, warps, st) for bm, st in tiles]


def _kernel_meta(G, D, dtype, per_cmp, per_sel, bj, num_selected, shared, bm, warps, stages):
    # Planes k < K: a compressed block reaches the K - 1 selection blocks after its own; the rotation
    # by k needs k < BJ.
    K = 1 + triton.cdiv(per_cmp - 1, per_sel)
    bj = max(bj, triton.next_power_of_2(K))
    W = max(bj, triton.next_power_of_2(num_selected))
    GP = triton.next_power_of_2(G)
    prec, upcast = dot_precision(dtype)
    return dict(
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GP=GP, BLOCK_M=bm, PER_CMP=per_cmp, PER_SEL=per_sel,
        PSP=triton.next_power_of_2(per_sel), KP=triton.next_power_of_2(K), BJ=bj, W=W,
        LOG_W=W.bit_length() - 1, LOG_WIDEN=(W // bj).bit_length() - 1, N_SEL=num_selected,
        ROWS=bm // GP if shared else bm, SHARED=shared, PREC=prec, UPCAST=upcast, num_warps=warps,
        num_stages=stages)


def _topn_launch(q, ck, lse, block, stride, sel_block, num_mem, num_selected, num_initial, num_local, shared,
                 scale):
    B, T, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    Hs = H if shared else HQ
    out = _empty((B, T, Hs, num_selected), dtype=torch.int32, device=q.device)
    if T == 0 or num_selected == 0:
        return out
    q, ck, lse = q.contiguous(), ck.contiguous(), lse.contiguous().float()
    args = (q, ck, lse, out, scale * LOG2E, T, H, G, ck.shape[1] - num_mem, num_mem, block, stride, sel_block,
            num_initial, num_local)
    meta = fitting(_topn_kernel, args, _kernel_metas(G, D, q.dtype, block, stride, sel_block, num_selected, shared),
                   q.device.index or 0, (G, D, q.dtype, block, stride, sel_block, num_selected, shared))
    _topn_kernel[(triton.cdiv(T, meta["BLOCK_M"] // meta["GP"]), B * H)](*args, **meta)
    return out


@torch.library.custom_op("nsa::topn_blocks", mutates_args=())
def _topn_op(q: torch.Tensor, ck: torch.Tensor, lse: torch.Tensor, block: int, stride: int, sel_block: int,
             num_mem: int, num_selected: int, num_initial: int, num_local: int, shared: bool,
             scale: float) -> torch.Tensor:
    return _topn_launch(q, ck, lse, block, stride, sel_block, num_mem, num_selected, num_initial, num_local,
                        shared, scale)


@_topn_op.register_fake
def _(q, ck, lse, block, stride, sel_block, num_mem, num_selected, num_initial, num_local, shared, scale):
    B, T, HQ, _ = q.shape
    return q.new_empty((B, T, ck.shape[2] if shared else HQ, num_selected), dtype=torch.int32)


def topn_blocks(q, ck, lse, p):
    """int32 [B, T, Hs, num_selected] selected blocks per query (Hs = H if shared else HQ), ascending,
    -1 padded: the top of p_slc with block 0..num_initial-1 and the num_local blocks ending at
    t // sel_block forced, ties to the lower index. q [B, T, HQ, D], ck [B, num_mem + N_c, H, D],
    lse [B, T, HQ] fp32 from `compressed_attention`. Not differentiable."""
    if not p.causal:
        raise NotImplementedError("the Triton top-n is causal only: use the torch backend "
                                  "(nsa.ops.reference.topn_blocks) for causal=False")
    block, stride, sel_block = p.compress_block, p.compress_stride, p.sel_block
    if block % stride or sel_block % stride:
        raise ValueError(f"stride {stride} must divide block {block} and sel_block {sel_block}")
    if q.shape[2] % ck.shape[2] or q.shape[2] // ck.shape[2] > 64:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple (at most 64x) of kv heads {ck.shape[2]}")
    return _topn_op(q.detach(), ck.detach(), lse.detach(), int(block), int(stride), int(sel_block), int(p.num_mem),
                    int(p.num_selected), int(p.num_initial), int(p.num_local), bool(p.shared_selection),
                    float(p.scale_for(q.shape[-1])))
