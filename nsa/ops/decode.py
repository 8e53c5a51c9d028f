"""Triton decode step: one query per sequence against the preallocated caches of `nsa.cache`.

`decode_attention` has the signature of `nsa.ops.reference.decode_attention`. A step is three
kernels, split flash-decoding style so that batch 1 fills the GPU as well as batch 16 does. A "pair" is
one (sequence b, selection head hs): with GQA-shared selection (the default) hs is a kv head and its G
query heads are one tile; with per-head selection hs is a query head (a tile of one).

1. `_partials_kernel`, grid (pairs, NC_SPLIT + W_SPLIT). Program c < NC_SPLIT runs the compressed
   attention of its pair over one chunk of the compressed rows (memory rows first, then the blocks
   complete at t), keeping an online softmax (m, l, acc) in fp32 that it writes as a partial, and it
   writes the raw scores of its compressed blocks (fp32, per query head) to a scratch row. Programs
   c >= NC_SPLIT each attend one chunk of the window (t - w, t] (the window cache may be a ring:
   position p in slot p % W) and write a partial the same way. The compressed keys are read once.
2. `_importance_kernel`, grid (pairs, chunks): merges the compressed (m, l) partials into the
   log-sum-exp and turns a chunk of the scores into probabilities summed over the pair's query heads
   (one fp32 per compressed block).
3. `_select_kernel`, grid (pairs,): maps those onto selection blocks by overlap (Eq. 9, 0-based),
   forces the initial and local blocks (+inf) and drops invalid ones (j > t // l'), takes the top-n by
   n arg-max passes over int64 keys (ties to the lower index), attends to the picked blocks (tokens
   <= t) in tiles whose loads do not wait on the arg-max, merges the compressed and window partials and
   writes g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

Grid sizes and chunk lengths depend only on static shapes (batch, heads, cache capacities), never on
t, which every program reads from the device and masks with: no host synchronisation, so the step can
be captured in a CUDA graph. Chunks past the current length write empty partials (m = -1e30, l = 0).
Any G works (the query tile is padded to a power of two >= 16).
"""

import functools
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from nsa.ops.common import ceil_div

# Allocator of the outputs and scratch; the tests swap in a poisoned one to catch elements the kernels
# forget to write, or read before writing.
_empty = torch.empty
MAX_SPLIT = 16  # most chunks per pair and branch (compressed, window)
_NO_KEY = tl.constexpr(-1.0e30)  # the running max of a partial with no key: finite, so merging never makes inf - inf


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter (3.9) gets bf16 x bf16 dots wrong; it computes in fp32 instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of an online softmax: scores s [BG, BN] (masked keys at -inf), values v [BN, BD]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _attend_range(q, K, V, row_stride, lo, hi, m_i, l_i, acc, scale, SC, sc_g, sc_off, offs_g, g_ok, offs_d, d_ok,
                  RING: tl.constexpr, SCORES: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Online softmax of q over positions [lo, hi) of K, V (row x at x % RING when RING > 0). With SCORES,
    also store the raw scores of positions x >= sc_off at SC + g * sc_g + (x - sc_off)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        x = start + offs_n
        x_ok = x < hi
        row = x % RING if RING > 0 else x
        kv_off = row[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        kv_mask = x_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = (_dot(q, tl.trans(k), PREC, UPCAST) * scale).to(tl.float32)
        if SCORES:
            sc_ptr = SC + offs_g[:, None].to(tl.int64) * sc_g + (x - sc_off)[None, :]
            tl.store(sc_ptr, s, mask=g_ok[:, None] & (x_ok & (x >= sc_off))[None, :])
        m_i, l_i, acc = _softmax_step(tl.where(x_ok[None, :], s, float("-inf")), v, m_i, l_i, acc, PREC, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _num_visible(t, L_CMP: tl.constexpr, STRIDE: tl.constexpr):
    """Compressed blocks complete at position t: block i once i * STRIDE + L_CMP - 1 <= t."""
    return tl.where(t + 1 >= L_CMP, (t + 1 - L_CMP) // STRIDE + 1, 0)


@triton.jit
def _pair_heads(pair, TPOS, sq_b, sq_h, HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """A pair's sequence b, kv head h, position t, its query-head rows (offs_g, g_ok), head dims
    (offs_d, d_ok) and the offsets of its query rows in a [B, HQ, D] tensor of strides sq_b, sq_h."""
    b = (pair // HS).to(tl.int64)
    hq0 = (pair % HS) * GS  # first query head of this pair
    h = (hq0 // G).to(tl.int64)  # its kv head
    t = tl.load(TPOS + b).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = b * sq_b + (hq0 + offs_g)[:, None].to(tl.int64) * sq_h + offs_d[None, :]
    return b, h, t, offs_g, offs_g < GS, offs_d, offs_d < D, q_off


@triton.jit
def _store_partial(PM, PL, PACC, pair, slot, m_i, l_i, acc, offs_g, offs_d, NPART: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial `slot` of a pair's query heads; layout [pair, head, slot] (and [.., D] for acc), so the
    combine kernel reads all slots of one head in one load."""
    row = (pair.to(tl.int64) * BLOCK_G + offs_g) * NPART + slot
    tl.store(PM + row, m_i)
    tl.store(PL + row, l_i)
    tl.store(PACC + row[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _partials_kernel(
    Q, QR, CK, CV, KW, VW, TPOS, PM, PL, PACC, SC,
    sq_b, sq_h, sck_b, sck_r, sck_h, skw_b, skw_s, skw_h, scale,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    NUM_MEM: tl.constexpr, NC_MAX: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr,
    WINDOW: tl.constexpr, W_SLOTS: tl.constexpr, NC_SPLIT: tl.constexpr, NC_CHUNK: tl.constexpr,
    W_CHUNK: tl.constexpr, NPART: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pair = tl.program_id(0)
    c = tl.program_id(1)
    b, h, t, offs_g, g_ok, offs_d, d_ok, q_off = _pair_heads(pair, TPOS, sq_b, sq_h, HS, GS, G, D, BLOCK_G, BLOCK_D)
    qmask = g_ok[:, None] & d_ok[None, :]
    m_i = tl.full([BLOCK_G], _NO_KEY, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    sc_base = SC + pair.to(tl.int64) * (BLOCK_G * NC_MAX)
    if c < NC_SPLIT:
        # Compressed rows [c * NC_CHUNK, ...) of the memory rows + the blocks complete at t.
        q = tl.load(Q + q_off, mask=qmask, other=0.0)
        lo = c * NC_CHUNK
        hi = tl.minimum(lo + NC_CHUNK, NUM_MEM + _num_visible(t, L_CMP, STRIDE))
        m_i, l_i, acc = _attend_range(q, CK + b * sck_b + h * sck_h, CV + b * sck_b + h * sck_h, sck_r, lo, hi,
                                      m_i, l_i, acc, scale, sc_base, NC_MAX, NUM_MEM, offs_g, g_ok, offs_d, d_ok,
                                      RING=0, SCORES=True, BLOCK_N=BLOCK_N, PREC=PREC, UPCAST=UPCAST)
    else:
        # Window positions (t - WINDOW, t], chunk c - NC_SPLIT of them.
        qr = tl.load(QR + q_off, mask=qmask, other=0.0)
        lo = tl.maximum(t - WINDOW + 1, 0) + (c - NC_SPLIT) * W_CHUNK
        hi = tl.minimum(lo + W_CHUNK, t + 1)
        m_i, l_i, acc = _attend_range(qr, KW + b * skw_b + h * skw_h, VW + b * skw_b + h * skw_h, skw_s, lo, hi,
                                      m_i, l_i, acc, scale, sc_base, NC_MAX, 0, offs_g, g_ok, offs_d, d_ok,
                                      RING=W_SLOTS, SCORES=False, BLOCK_N=BLOCK_N, PREC=PREC, UPCAST=UPCAST)
    _store_partial(PM, PL, PACC, pair, c, m_i, l_i, acc, offs_g, offs_d, NPART, BLOCK_G, BLOCK_D)


@triton.jit
def _importance_kernel(
    TPOS, PM, PL, SC, PC,
    HS: tl.constexpr, GS: tl.constexpr, NC_MAX: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr,
    NC_SPLIT: tl.constexpr, NC_PAD: tl.constexpr, P_CHUNK: tl.constexpr, NPART: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """p[i] = sum over the pair's query heads g of exp(s[g, i] - lse[g]), compressed blocks
    [c * P_CHUNK, (c + 1) * P_CHUNK) of program c; lse from the compressed partials."""
    pair = tl.program_id(0)
    c = tl.program_id(1)
    t = tl.load(TPOS + pair // HS).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, NC_PAD)
    g_ok = offs_g < GS
    row = (pair.to(tl.int64) * BLOCK_G + offs_g)[:, None] * NPART + offs_c[None, :]
    c_ok = (offs_c < NC_SPLIT)[None, :]
    m_c = tl.load(PM + row, mask=c_ok, other=_NO_KEY)
    l_c = tl.load(PL + row, mask=c_ok, other=0.0)
    m = tl.max(m_c, axis=1)
    l_i = tl.sum(l_c * tl.exp(m_c - m[:, None]), axis=1)
    has = l_i > 0
    lse = m + tl.log(tl.where(has, l_i, 1.0))
    n_vis = _num_visible(t, L_CMP, STRIDE)
    sc_base = SC + pair.to(tl.int64) * (BLOCK_G * NC_MAX)
    pc_base = PC + pair.to(tl.int64) * NC_MAX
    offs_p = tl.arange(0, BLOCK_P)
    lo = c * P_CHUNK
    hi = tl.minimum(lo + P_CHUNK, n_vis)
    for start in range(lo, hi, BLOCK_P):
        i = start + offs_p
        i_ok = i < hi
        ok = g_ok[:, None] & i_ok[None, :] & has[:, None]
        s = tl.load(sc_base + offs_g[:, None] * NC_MAX + i[None, :], mask=ok, other=0.0)
        tl.store(pc_base + i, tl.sum(tl.where(ok, tl.exp(s - lse[:, None]), 0.0), axis=0), mask=i_ok)


@triton.jit
def _select_kernel(
    QR, KS, VS, TPOS, IDX, PM, PL, PACC, PC,
    sq_b, sq_h, sks_b, sks_s, sks_h, scale,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    NC_MAX: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr,
    SEL: tl.constexpr, NSEL: tl.constexpr, NSEL_PAD: tl.constexpr, NUM_INIT: tl.constexpr,
    NUM_LOCAL: tl.constexpr, NS_PAD: tl.constexpr, R_OVL: tl.constexpr, S_SPLIT: tl.constexpr,
    SLOT0: tl.constexpr, NPART: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Top-n of the pair (every program of the pair computes it; program 0 writes the indices), then
    program k attends to the picks of rank k, k + S_SPLIT, ... and writes partial SLOT0 + k."""
    pair = tl.program_id(0)
    k_split = tl.program_id(1)
    b, h, t, offs_g, g_ok, offs_d, d_ok, q_off = _pair_heads(pair, TPOS, sq_b, sq_h, HS, GS, G, D, BLOCK_G, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    # ---- importance of selection block j: sum_i c(i, j) * p[i] over the blocks i overlapping it -----
    n_vis = _num_visible(t, L_CMP, STRIDE)
    PER_CMP: tl.constexpr = L_CMP // STRIDE  # chunks per compressed block
    PER_SEL: tl.constexpr = SEL // STRIDE  # chunks per selection block
    offs_j = tl.arange(0, NS_PAD)
    offs_r = tl.arange(0, R_OVL)
    i2 = offs_j[:, None] * PER_SEL - PER_CMP + 1 + offs_r[None, :]
    lo = tl.maximum(i2, offs_j[:, None] * PER_SEL)
    hi = tl.minimum(i2 + PER_CMP, (offs_j[:, None] + 1) * PER_SEL)
    w = tl.maximum(hi - lo, 0).to(tl.float32)
    i2_ok = (i2 >= 0) & (i2 < n_vis) & (offs_r[None, :] < PER_SEL + PER_CMP - 1)
    pc = tl.load(PC + pair.to(tl.int64) * NC_MAX + i2, mask=i2_ok, other=0.0)
    imp = tl.sum(w * pc, axis=1)
    cur = t // SEL
    valid = offs_j <= cur
    forced = valid & ((offs_j < NUM_INIT) | ((cur - offs_j >= 0) & (cur - offs_j < NUM_LOCAL)))
    imp = tl.where(forced, float("inf"), imp)

    # ---- top-n: n arg-max passes over int64 keys (importance bits, then the lower index) -----------
    # imp >= 0 or +inf, so its fp32 bits order like the values; invalid blocks get key -1.
    key = (imp.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (NS_PAD - 1 - offs_j).to(tl.int64)
    key = tl.where(valid, key, -1)
    offs_s = tl.arange(0, NSEL_PAD)
    picks = tl.full([NSEL_PAD], -1, tl.int32)
    for n in range(NSEL):
        best = tl.max(key, axis=0)
        key = tl.where(key == best, -1, key)
        picks = tl.where(offs_s == n, tl.where(best >= 0, NS_PAD - 1 - (best & 0xFFFFFFFF).to(tl.int32), -1), picks)
    if k_split == 0:
        tl.store(IDX + pair.to(tl.int64) * NSEL + offs_s, picks, mask=offs_s < NSEL)

    # ---- selected attention over this program's picks ----------------------------------------------
    qr = tl.load(QR + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    ks_base = KS + b * sks_b + h * sks_h
    vs_base = VS + b * sks_b + h * sks_h
    m_i = tl.full([BLOCK_G], _NO_KEY, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # One flat loop with a static trip count over this program's tiles (rank k_split + S_SPLIT * u,
    # BLOCK_N positions at a time): the addresses do not depend on earlier loads, so Triton pipelines it.
    TILES: tl.constexpr = (SEL + BLOCK_N - 1) // BLOCK_N  # tiles per selection block
    MY_RANKS: tl.constexpr = (NSEL + S_SPLIT - 1) // S_SPLIT
    for it in range(MY_RANKS * TILES):
        r = k_split + (it // TILES) * S_SPLIT
        blk = tl.where(r < NSEL, tl.sum(tl.where(offs_s == r, picks, 0), axis=0), -1)  # -1: no pick
        x = (it % TILES) * BLOCK_N + offs_n
        tok = blk * SEL + x
        tok_ok = (x < SEL) & (tok <= t) & (tok >= 0)  # a missing pick (-1) gives tok < 0
        kv_off = tok[:, None].to(tl.int64) * sks_s + offs_d[None, :]
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(ks_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(vs_base + kv_off, mask=kv_mask, other=0.0)
        s = tl.where(tok_ok[None, :], (_dot(qr, tl.trans(k), PREC, UPCAST) * scale).to(tl.float32), float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, PREC, UPCAST)
    _store_partial(PM, PL, PACC, pair, SLOT0 + k_split, m_i, l_i, acc, offs_g, offs_d, NPART, BLOCK_G, BLOCK_D)


@triton.jit
def _branch(m_c, l_c, acc_c, in_branch):
    """Merge the partials (rows of m_c, l_c, acc_c) where in_branch into the normalised branch output."""
    m_c = tl.where(in_branch, m_c, _NO_KEY)
    a = tl.where(in_branch, tl.exp(m_c - tl.max(m_c, axis=0)), 0.0)
    l_i = tl.sum(a * l_c, axis=0)
    return tl.sum(a[:, None] * acc_c, axis=0) / tl.where(l_i > 0, l_i, 1.0)


@triton.jit
def _combine_kernel(
    GATES, O, PM, PL, PACC, sg_b, sg_h, so_b, so_h,
    HQ: tl.constexpr, HS: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, NC_SPLIT: tl.constexpr,
    W_SPLIT: tl.constexpr, NPART: tl.constexpr, NPART_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One query head: merge each branch's partials (one load of all its slots) and gate them."""
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    hq = pid % HQ
    pair = b * HS + hq // GS
    offs_c = tl.arange(0, NPART_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < NPART
    row = (pair * BLOCK_G + hq % GS) * NPART + offs_c
    m_c = tl.load(PM + row, mask=c_ok, other=_NO_KEY)
    l_c = tl.load(PL + row, mask=c_ok, other=0.0)
    acc_c = tl.load(PACC + row[:, None] * BLOCK_D + offs_d[None, :], mask=c_ok[:, None], other=0.0)
    g_off = b * sg_b + hq.to(tl.int64) * sg_h
    out = tl.load(GATES + g_off).to(tl.float32) * _branch(m_c, l_c, acc_c, offs_c < NC_SPLIT)
    out += tl.load(GATES + g_off + 1).to(tl.float32) * _branch(m_c, l_c, acc_c, c_ok & (offs_c >= NC_SPLIT + W_SPLIT))
    out += tl.load(GATES + g_off + 2).to(tl.float32) * _branch(
        m_c, l_c, acc_c, (offs_c >= NC_SPLIT) & (offs_c < NC_SPLIT + W_SPLIT))
    tl.store(O + b * so_b + hq.to(tl.int64) * so_h + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(length, pairs, target, block_n):
    """(chunks, chunk length): about `target` programs over `pairs`, chunks a multiple of block_n."""
    length = max(length, 1)
    chunks = max(1, min(ceil_div(target, pairs), ceil_div(length, block_n)))
    chunk = ceil_div(ceil_div(length, chunks), block_n) * block_n
    return ceil_div(length, chunk), chunk


def _decode_launch(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, block, stride, sel_block, num_mem,
                   num_selected, num_initial, num_local, window, shared, scale, block_n, num_warps, splits):
    B, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    Hs = H if shared else HQ
    GS = HQ // Hs
    S, W = k_slc.shape[1], k_win.shape[1]
    nc_max = max(ck.shape[1] - num_mem, 1)
    q, q_rot, gates = q.contiguous(), q_rot.contiguous(), gates.contiguous()
    t = t.to(torch.int32) if t.dtype != torch.int32 else t
    BLOCK_G = max(16, triton.next_power_of_2(GS))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_n is None:
        block_n = 64 if BLOCK_G * BLOCK_D <= 64 * 128 else 32
    if num_warps is None:
        num_warps = 4 if BLOCK_G * BLOCK_D <= 16 * 128 else 8
    pairs = B * Hs
    if splits is None:
        # About 4 programs per SM for the compressed keys (the most bytes), 2 for the window; at most
        # MAX_SPLIT chunks per pair and branch, so the merges stay one load. The selection programs
        # each redo the pair's top-n, so they fill one wave at most.
        sms = _num_sms(q.device.index or 0) if q.is_cuda else 4
        nc_split, nc_chunk = _split(ck.shape[1], pairs, min(4 * sms, MAX_SPLIT * pairs), block_n)
        w_split, w_chunk = _split(min(window, S), pairs, min(2 * sms, MAX_SPLIT * pairs), block_n)
        s_split = max(1, min(num_selected, sms // pairs))
    else:
        nc_split, w_split, s_split = splits
        nc_chunk, w_chunk = ceil_div(max(ck.shape[1], 1), nc_split), ceil_div(min(window, S), w_split)
    npart = nc_split + w_split + s_split
    f32 = dict(dtype=torch.float32, device=q.device)
    pm = _empty(pairs * BLOCK_G * npart, **f32)
    pl = _empty(pairs * BLOCK_G * npart, **f32)
    pacc = _empty(pairs * BLOCK_G * npart * BLOCK_D, **f32)
    sc = _empty(pairs * BLOCK_G * nc_max, **f32)  # raw compressed scores per query head
    pc = _empty(pairs * nc_max, **f32)  # their probabilities summed over the pair's heads
    o = _empty(q.shape, dtype=q.dtype, device=q.device)
    idx = _empty((B, Hs, num_selected), dtype=torch.int32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = os.environ.get("TRITON_INTERPRET") == "1"
    common = dict(HS=Hs, GS=GS, NPART=npart, BLOCK_G=BLOCK_G)
    attn = dict(G=G, D=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n, PREC=prec, UPCAST=upcast, num_warps=num_warps)
    cmp = dict(NC_MAX=nc_max, L_CMP=block, STRIDE=stride)
    _partials_kernel[(pairs, nc_split + w_split)](
        q, q_rot, ck, cv, k_win, v_win, t, pm, pl, pacc, sc,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2),
        k_win.stride(0), k_win.stride(1), k_win.stride(2), float(scale),
        NUM_MEM=num_mem, WINDOW=window, W_SLOTS=W, NC_SPLIT=nc_split, NC_CHUNK=nc_chunk, W_CHUNK=w_chunk,
        **common, **attn, **cmp)
    block_p = max(16, min(128, triton.next_power_of_2(nc_max)))
    p_chunk = ceil_div(ceil_div(nc_max, nc_split), block_p) * block_p
    _importance_kernel[(pairs, ceil_div(nc_max, p_chunk))](
        t, pm, pl, sc, pc, NC_SPLIT=nc_split, NC_PAD=triton.next_power_of_2(nc_split), P_CHUNK=p_chunk,
        BLOCK_P=block_p, **common, **cmp, num_warps=4)
    per_cmp, per_sel = block // stride, sel_block // stride
    _select_kernel[(pairs, s_split)](
        q_rot, k_slc, v_slc, t, idx, pm, pl, pacc, pc,
        q.stride(0), q.stride(1), k_slc.stride(0), k_slc.stride(1), k_slc.stride(2), float(scale),
        SEL=sel_block, NSEL=num_selected, NSEL_PAD=triton.next_power_of_2(num_selected), NUM_INIT=num_initial,
        NUM_LOCAL=num_local, NS_PAD=max(16, triton.next_power_of_2(ceil_div(S, sel_block))),
        R_OVL=triton.next_power_of_2(per_sel + per_cmp - 1), S_SPLIT=s_split, SLOT0=nc_split + w_split,
        **common, **attn, **cmp)
    _combine_kernel[(B * HQ,)](
        gates, o, pm, pl, pacc, gates.stride(0), gates.stride(1), o.stride(0), o.stride(1),
        HQ=HQ, D=D, NC_SPLIT=nc_split, W_SPLIT=w_split, NPART_PAD=triton.next_power_of_2(npart),
        BLOCK_D=BLOCK_D, **common, num_warps=4)
    return o, idx


@torch.library.custom_op("nsa::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, q_rot: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, k_slc: torch.Tensor,
               v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, t: torch.Tensor,
               block: int, stride: int, sel_block: int, num_mem: int, num_selected: int, num_initial: int,
               num_local: int, window: int, shared: bool, scale: float, block_n: Optional[int],
               num_warps: Optional[int], splits: Optional[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    # A custom op, so torch.compile calls it as one opaque step instead of tracing the launches (which
    # would copy the scratch buffers the kernels write into).
    return _decode_launch(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, block, stride, sel_block, num_mem,
                          num_selected, num_initial, num_local, window, shared, scale, block_n, num_warps, splits)


@_decode_op.register_fake
def _(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, block, stride, sel_block, num_mem, num_selected,
      num_initial, num_local, window, shared, scale, block_n, num_warps, splits):
    Hs = ck.shape[2] if shared else q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[0], Hs, num_selected), dtype=torch.int32)


def decode_attention(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, p, return_indices=False,
                     block_n=None, num_warps=None, splits=None):
    """Triton twin of `nsa.ops.reference.decode_attention` (see there for shapes). The selected block
    indices it returns (return_indices) are in the order picked, not sorted. `splits` = (compressed
    chunks, window chunks, selection programs) per pair overrides the default."""
    for x in (ck, cv, k_slc, v_slc, k_win, v_win):
        if x.stride(-1) != 1:
            raise ValueError("decode caches must have a contiguous last dimension")
    if k_slc.stride() != v_slc.stride() or k_win.stride() != v_win.stride() or ck.stride() != cv.stride():
        raise ValueError("decode caches: keys and values must share strides")
    if q.shape[1] % ck.shape[2]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {ck.shape[2]}")
    o, idx = _decode_op(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, int(p.compress_block),
                        int(p.compress_stride), int(p.sel_block), int(p.num_mem), int(p.num_selected),
                        int(p.num_initial), int(p.num_local), int(p.window), bool(p.shared_selection),
                        float(p.scale_for(q.shape[-1])), block_n, num_warps, None if splits is None else list(splits))
    return (o, idx) if return_indices else o
