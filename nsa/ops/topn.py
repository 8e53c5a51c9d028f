"""Streaming top-n selection blocks: block importance and top-n in one Triton pass.

Reference twin: `nsa.ops.reference.topn_blocks` (= `block_importance` + `select_blocks`). The
importance matrix [T, N_s] is never stored: each program owns one kv head and a tile of query rows
(tokens x the G heads of the group, as in `nsa.ops.range_attention`) and walks the selection blocks
in chunks of BJ, keeping a running top-n per row in registers. For the chunk [j0, j0 + BJ):

1. recompute p = exp(q . ck * scale - lse) for the compressed blocks i in [j0, j0 + BJ) * l'/d
   (memory keys excluded, invisible blocks 0);
2. map them onto selection blocks by overlap, importance = p @ C with C[i, j] = c(i, j) the number of
   stride-chunks compressed block i and selection block j share (`reference.overlap_matrix`), built
   on the fly. A compressed block can reach past the chunk into the next one (for l=32, d=16,
   l'=64 block 4j+3 also counts for block j+1), so p @ C of the next chunk is carried over;
3. if shared, sum over the G heads of the group;
4. mark forced blocks +inf and invalid blocks (j > t // l') -inf, then merge the chunk into the
   running top-n: while some row's best remaining candidate beats its worst kept block, swap them.

Order is (importance descending, index ascending) in both the kernel and the reference, so exact
ties resolve to the lower block index in both; importance values themselves may differ from the
reference's by rounding (summation order), which can flip blocks whose importances are within
rounding of each other. The result is sorted ascending and padded with -1, like the reference.
"""

import math
import os

import torch
import triton
import triton.language as tl

from nsa.ops.range_attention import _dot, _query_rows

# Larger than any block index; also makes the empty slots' indices distinct (BIG + slot).
BIG: tl.constexpr = tl.constexpr(2**30)

# Output allocator; the tests swap in a poisoned one to catch elements the kernel forgets to write.
_empty = torch.empty


@triton.jit
def _overlap(i, j, PER_CMP, PER_SEL):
    """c(i, j) [len(i), len(j)] fp32: stride-chunks shared by compressed block i and selection block j."""
    lo = tl.maximum(i[:, None], j[None, :] * PER_SEL)
    hi = tl.minimum(i[:, None] + PER_CMP, (j[None, :] + 1) * PER_SEL)
    return tl.maximum(hi - lo, 0).to(tl.float32)


@triton.jit
def _best(val, idx):
    """Per row: the highest value and, among equal values, the lowest index."""
    v = tl.max(val, 1)
    i = tl.min(tl.where(val == v[:, None], idx, BIG), 1)
    return v, i


@triton.jit
def _worst(val, idx):
    """Per row: the lowest value and, among equal values, the highest index (the first to drop)."""
    v = tl.min(val, 1)
    i = tl.max(tl.where(val == v[:, None], idx, -BIG), 1)
    return v, i


@triton.jit
def _beats(v1, i1, v2, i2):
    return (v1 > float("-inf")) & ((v1 > v2) | ((v1 == v2) & (i1 < i2)))


@triton.jit
def _topn_kernel(Q, CK, LSE, OUT, qk_scale, T, H, G, NUM_CMP, NUM_MEM, BLOCK, STRIDE, SEL_BLOCK,
                 PER_CMP, PER_SEL, NUM_INITIAL, NUM_LOCAL,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BJ: tl.constexpr, BLOCK_C: tl.constexpr, N_SEL: tl.constexpr, NP: tl.constexpr,
                 ROWS: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    HQ = H * G
    S = NUM_MEM + NUM_CMP
    t0 = pid_m * BLOCK_T
    t, g, row_ok = _query_rows(t0, T, G, GP, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    row_off = (b * T + t).to(tl.int64) * HQ + h * G + g
    q = tl.load(Q + row_off[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE + row_off, mask=row_ok, other=0.0) * 1.4426950408889634
    # Compressed block i is visible to token t iff i < n_visible(t) (its last token is <= t).
    n_visible = tl.maximum(t + STRIDE - BLOCK + 1, 0) // STRIDE

    # Rows of the running top-n: one per token if shared (heads summed), else one per (token, head).
    if SHARED:
        tr = t0 + tl.arange(0, ROWS)
    else:
        tr = t
    cur = tr // SEL_BLOCK
    col = tl.arange(0, NP)[None, :] + tl.zeros([ROWS, NP], tl.int32)
    # Slots >= N_SEL only pad n to a power of two: +inf keeps them from ever being the worst slot.
    top_v = tl.where(col < N_SEL, float("-inf"), float("inf"))
    top_i = tl.where(col < N_SEL, BIG + col, -1 - col)

    carry = tl.zeros([BLOCK_M, BJ], tl.float32)
    t_last = tl.minimum(t0 + BLOCK_T - 1, T - 1)
    for j0 in range(0, t_last // SEL_BLOCK + 1, BJ):
        # 1. probabilities of the compressed blocks that start in this chunk
        i = j0 * PER_SEL + tl.arange(0, BLOCK_C)
        i_ok = (i < (j0 + BJ) * PER_SEL) & (i < NUM_CMP)
        ck_off = ((b * S + NUM_MEM + i).to(tl.int64) * H + h) * D
        ck = tl.load(CK + ck_off[:, None] + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(ck), PREC, UPCAST) * qk_scale
        visible = row_ok[:, None] & i_ok[None, :] & (i[None, :] < n_visible[:, None])
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        # 2. overlap mapping; tf32x3 keeps p's fp32 accuracy (C holds small integers, exact in tf32)
        j = j0 + tl.arange(0, BJ)
        acc = carry + tl.dot(p, _overlap(i, j, PER_CMP, PER_SEL), input_precision="tf32x3")
        carry = tl.dot(p, _overlap(i, j + BJ, PER_CMP, PER_SEL), input_precision="tf32x3")
        # 3. group sum
        if SHARED:
            imp = tl.sum(tl.reshape(acc, (BLOCK_T, GP, BJ)), 1)
        else:
            imp = acc
        # 4. candidates and merge
        valid = j[None, :] <= cur[:, None]
        forced = valid & ((j[None, :] < NUM_INITIAL) | (cur[:, None] - j[None, :] < NUM_LOCAL))
        cand_v = tl.where(forced, float("inf"), tl.where(valid, imp, float("-inf")))
        cand_i = j[None, :] + tl.zeros([ROWS, BJ], tl.int32)
        best_v, best_i = _best(cand_v, cand_i)
        worst_v, worst_i = _worst(top_v, top_i)
        swap = _beats(best_v, best_i, worst_v, worst_i)
        while tl.max(swap.to(tl.int32), 0) > 0:
            into = swap[:, None] & (top_i == worst_i[:, None])
            top_v = tl.where(into, best_v[:, None], top_v)
            top_i = tl.where(into, best_i[:, None], top_i)
            cand_v = tl.where(swap[:, None] & (cand_i == best_i[:, None]), float("-inf"), cand_v)
            best_v, best_i = _best(cand_v, cand_i)
            worst_v, worst_i = _worst(top_v, top_i)
            swap = _beats(best_v, best_i, worst_v, worst_i)

    # Ascending indices, unused slots (-inf, padding) last as -1.
    key = tl.sort(tl.where((col < N_SEL) & (top_v > float("-inf")), top_i, BIG), 1)
    key = tl.where(key >= BIG, -1, key)
    if SHARED:
        out_row = (b * T + tr).to(tl.int64) * H + h
        out_ok = tr < T
    else:
        out_row = row_off
        out_ok = row_ok
    tl.store(OUT + out_row[:, None] * N_SEL + col, key, mask=out_ok[:, None] & (col < N_SEL))


def _tiles(G, per_sel, per_cmp):
    """(BLOCK_M, BJ): about 64 query rows and 64 compressed keys per step; small in the interpreter."""
    GP = triton.next_power_of_2(G)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    bm = max(16 if interpreting else 64, GP)
    bj = 16 if interpreting else max(16, triton.next_power_of_2(triton.cdiv(64, per_sel)))
    # The carried-over next chunk must hold everything a chunk's compressed blocks reach.
    while (bj * per_sel) < per_cmp - 1:
        bj *= 2
    return bm, bj


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
    per_cmp, per_sel = block // stride, sel_block // stride
    bm, bj = _tiles(G, per_sel, per_cmp)
    GP = triton.next_power_of_2(G)
    grid = (triton.cdiv(T, bm // GP), B * H)
    _topn_kernel[grid](
        q, ck, lse, out, scale * math.log2(math.e), T, H, G, ck.shape[1] - num_mem, num_mem, block, stride,
        sel_block, per_cmp, per_sel, num_initial, num_local,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GP=GP, BLOCK_M=bm, BJ=bj,
        BLOCK_C=triton.next_power_of_2(bj * per_sel), N_SEL=num_selected, NP=triton.next_power_of_2(num_selected),
        ROWS=bm // GP if shared else bm, SHARED=shared, PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4)
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


def topn_blocks(q, ck, lse, block, stride, sel_block, num_mem, num_selected, num_initial=1, num_local=2,
                shared=True, scale=None, causal=True):
    """int32 [B, T, Hs, num_selected] selected blocks per query (Hs = H if shared else HQ), ascending,
    -1 padded: the top of p_slc with block 0..num_initial-1 and the num_local blocks ending at
    t // sel_block forced, ties to the lower index. q [B, T, HQ, D], ck [B, num_mem + N_c, H, D],
    lse [B, T, HQ] fp32 from `compressed_attention`. Not differentiable."""
    if not causal:
        raise NotImplementedError("the Triton top-n is causal only: use the torch backend "
                                  "(nsa.ops.reference.topn_blocks) for causal=False")
    if block % stride or sel_block % stride:
        raise ValueError(f"stride {stride} must divide block {block} and sel_block {sel_block}")
    if q.shape[2] % ck.shape[2] or q.shape[2] // ck.shape[2] > 64:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple (at most 64x) of kv heads {ck.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _topn_op(q.detach(), ck.detach(), lse.detach(), int(block), int(stride), int(sel_block), int(num_mem),
                    int(num_selected), int(num_initial), int(num_local), bool(shared), float(scale))
