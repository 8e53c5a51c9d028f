"""Triton decode step: one query per sequence against the preallocated caches of `nsa.cache`.

`decode_attention` has the signature of `nsa.ops.reference.decode_attention` and runs one fused
kernel per layer step. Each program owns one (sequence b, selection head hs) pair: with GQA-shared
selection (the default) hs is a kv head and the program serves its G query heads as one tile; with
per-head selection hs is a query head (a tile of one). A program

1. runs the compressed attention of its query heads over the memory rows and the compressed blocks
   that are complete at t (online softmax in fp32), keeping o_cmp and the log-sum-exp;
2. recomputes the compressed scores once more with the final log-sum-exp, sums the probabilities over
   its query heads and writes them (one fp32 per compressed block) to a small scratch row; maps them
   onto selection blocks by overlap (Eq. 9, 0-based) into a register vector, forced blocks at +inf,
   invalid ones (j > t // l') at -inf;
3. takes the top-n by n arg-max passes over that vector (ties to the lower index) and attends to each
   picked block as soon as it is found (tokens <= t), one online softmax across blocks;
4. attends to the window (t - w, t] (the window cache may be a ring: position p in slot p % W);
5. writes g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

No host synchronisation: every length is read from the device tensor t, so the launch can be
captured in a CUDA graph. Any G works (the query tile is padded to a power of two >= 16).
"""

import os

import torch
import triton
import triton.language as tl

from nsa.ops.common import ceil_div




@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter (3.9) gets bf16 x bf16 dots wrong; it computes in fp32 instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _online_tile(q, k, v, valid, m_i, l_i, acc, scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of an online softmax: q [BG, BD], k, v [BN, BD], valid [BG, BN] (or [1, BN])."""
    s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _nsa_decode_kernel(
    Q, QR, CK, CV, KS, VS, KW, VW, GATES, TPOS, O, IDX, PC,
    sq_b, sq_h, sck_b, sck_r, sck_h, sks_b, sks_s, sks_h, skw_b, skw_s, skw_h,
    sg_b, sg_h, so_b, so_h, scale,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    NUM_MEM: tl.constexpr, NC_MAX: tl.constexpr, L_CMP: tl.constexpr, STRIDE: tl.constexpr,
    SEL: tl.constexpr, NSEL: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    WINDOW: tl.constexpr, W_SLOTS: tl.constexpr, NS_PAD: tl.constexpr, R_OVL: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // HS).to(tl.int64)
    hs = pid % HS
    hq0 = hs * GS  # first query head of this program
    h = (hq0 // G).to(tl.int64)  # its kv head
    t = tl.load(TPOS + b).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GS
    d_ok = offs_d < D
    qmask = g_ok[:, None] & d_ok[None, :]
    q_off = b * sq_b + (hq0 + offs_g)[:, None].to(tl.int64) * sq_h + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qmask, other=0.0)
    qr = tl.load(QR + q_off, mask=qmask, other=0.0)
    g_off = b * sg_b + (hq0 + offs_g).to(tl.int64) * sg_h
    gate_cmp = tl.load(GATES + g_off + 0, mask=g_ok, other=0.0).to(tl.float32)
    gate_slc = tl.load(GATES + g_off + 1, mask=g_ok, other=0.0).to(tl.float32)
    gate_win = tl.load(GATES + g_off + 2, mask=g_ok, other=0.0).to(tl.float32)

    # ---- 1. compressed attention over memory rows + complete blocks ------------------------------
    n_vis = tl.where(t + 1 >= L_CMP, (t + 1 - L_CMP) // STRIDE + 1, 0)
    n_rows = NUM_MEM + n_vis
    ck_base = CK + b * sck_b + h * sck_h
    cv_base = CV + b * sck_b + h * sck_h
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        r = start + offs_n
        r_ok = r < n_rows
        kv_off = r[:, None].to(tl.int64) * sck_r + offs_d[None, :]
        kv_mask = r_ok[:, None] & d_ok[None, :]
        k = tl.load(ck_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(cv_base + kv_off, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_tile(q, k, v, r_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    out = gate_cmp[:, None] * (acc / tl.where(has, l_i, 1.0)[:, None])

    # ---- 2. importance: p_cmp summed over the tile's heads, then overlap onto selection blocks ----
    pc_base = PC + pid.to(tl.int64) * NC_MAX
    lse_safe = tl.where(has, lse, 0.0)
    for start in range(0, n_vis, BLOCK_N):
        i = start + offs_n
        i_ok = i < n_vis
        k_off = (NUM_MEM + i)[:, None].to(tl.int64) * sck_r + offs_d[None, :]
        k = tl.load(ck_base + k_off, mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        p = tl.where(g_ok[:, None] & i_ok[None, :] & has[:, None], tl.exp(s - lse_safe[:, None]), 0.0)
        tl.store(pc_base + i, tl.sum(p, axis=0), mask=i_ok)
    tl.debug_barrier()
    PER_CMP: tl.constexpr = L_CMP // STRIDE  # chunks per compressed block
    PER_SEL: tl.constexpr = SEL // STRIDE  # chunks per selection block
    offs_j = tl.arange(0, NS_PAD)
    offs_r = tl.arange(0, R_OVL)
    # Selection block j gets c(i, j) * p[i] from compressed blocks i = j*PER_SEL - PER_CMP + 1 + r.
    i2 = offs_j[:, None] * PER_SEL - PER_CMP + 1 + offs_r[None, :]
    lo = tl.maximum(i2, offs_j[:, None] * PER_SEL)
    hi = tl.minimum(i2 + PER_CMP, (offs_j[:, None] + 1) * PER_SEL)
    w = tl.maximum(hi - lo, 0).to(tl.float32)
    i2_ok = (i2 >= 0) & (i2 < n_vis) & (offs_r[None, :] < PER_SEL + PER_CMP - 1)
    pc = tl.load(pc_base + i2, mask=i2_ok, other=0.0)
    imp = tl.sum(w * pc, axis=1)
    cur = t // SEL
    valid = offs_j <= cur
    forced = valid & ((offs_j < NUM_INIT) | ((cur - offs_j >= 0) & (cur - offs_j < NUM_LOCAL)))
    imp = tl.where(forced, float("inf"), imp)
    imp = tl.where(valid, imp, float("-inf"))

    # ---- 3. top-n by repeated arg-max, attending to each picked block ---------------------------
    ks_base = KS + b * sks_b + h * sks_h
    vs_base = VS + b * sks_b + h * sks_h
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    idx_base = IDX + pid.to(tl.int64) * NSEL
    for n in range(NSEL):
        best_v = tl.max(imp, axis=0)
        best = tl.min(tl.where(imp == best_v, offs_j, NS_PAD), axis=0)
        ok = best_v > float("-inf")
        imp = tl.where(offs_j == best, float("-inf"), imp)
        tl.store(idx_base + n, tl.where(ok, best, -1))
        tok_lo = best * SEL
        tok_hi = tl.where(ok, tl.minimum(tok_lo + SEL, t + 1), tok_lo)
        for start in range(tok_lo, tok_hi, BLOCK_N):
            s_idx = start + offs_n
            s_ok = s_idx < tok_hi
            kv_off = s_idx[:, None].to(tl.int64) * sks_s + offs_d[None, :]
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(ks_base + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(vs_base + kv_off, mask=kv_mask, other=0.0)
            m_i, l_i, acc = _online_tile(qr, k, v, s_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
    has = l_i > 0
    out += gate_slc[:, None] * (acc / tl.where(has, l_i, 1.0)[:, None])

    # ---- 4. sliding window (t - WINDOW, t], position p in slot p % W_SLOTS ----------------------
    kw_base = KW + b * skw_b + h * skw_h
    vw_base = VW + b * skw_b + h * skw_h
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    w_lo = tl.maximum(t - WINDOW + 1, 0)
    for start in range(w_lo, t + 1, BLOCK_N):
        p_idx = start + offs_n
        p_ok = p_idx <= t
        slot = p_idx % W_SLOTS
        kv_off = slot[:, None].to(tl.int64) * skw_s + offs_d[None, :]
        kv_mask = p_ok[:, None] & d_ok[None, :]
        k = tl.load(kw_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(vw_base + kv_off, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_tile(qr, k, v, p_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
    has = l_i > 0
    out += gate_win[:, None] * (acc / tl.where(has, l_i, 1.0)[:, None])

    o_off = b * so_b + (hq0 + offs_g)[:, None].to(tl.int64) * so_h + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=qmask)


def decode_attention(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, block, stride, sel_block,
                     num_mem, num_selected, num_initial=1, num_local=2, window=512, shared=True, scale=None,
                     return_indices=False, block_n=None, num_warps=None):
    """Triton twin of `nsa.ops.reference.decode_attention` (see there for shapes). The selected block
    indices it returns (return_indices) are in the order picked, not sorted."""
    B, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    scale = D**-0.5 if scale is None else scale
    Hs = H if shared else HQ
    GS = HQ // Hs
    S, W = k_slc.shape[1], k_win.shape[1]
    nc_max = ck.shape[1] - num_mem
    for x in (ck, cv, k_slc, v_slc, k_win, v_win):
        if x.stride(-1) != 1:
            raise ValueError("decode caches must have a contiguous last dimension")
    if k_slc.stride() != v_slc.stride() or k_win.stride() != v_win.stride() or ck.stride() != cv.stride():
        raise ValueError("decode caches: keys and values must share strides")
    q, q_rot, gates = q.contiguous(), q_rot.contiguous(), gates.contiguous()
    t = t.to(torch.int32) if t.dtype != torch.int32 else t
    o = torch.empty_like(q)
    idx = torch.empty(B, Hs, num_selected, dtype=torch.int32, device=q.device)
    pc = torch.empty(B * Hs, max(nc_max, 1), dtype=torch.float32, device=q.device)
    BLOCK_G = max(16, triton.next_power_of_2(GS))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_n is None:
        block_n = 64 if BLOCK_G * BLOCK_D <= 64 * 128 else 32
    if num_warps is None:
        num_warps = 4 if BLOCK_G * BLOCK_D <= 16 * 128 else 8
    per_cmp, per_sel = block // stride, sel_block // stride
    _nsa_decode_kernel[(B * Hs,)](
        q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, o, idx, pc,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2),
        k_slc.stride(0), k_slc.stride(1), k_slc.stride(2), k_win.stride(0), k_win.stride(1), k_win.stride(2),
        gates.stride(0), gates.stride(1), o.stride(0), o.stride(1), float(scale),
        HS=Hs, GS=GS, G=G, D=D, NUM_MEM=num_mem, NC_MAX=max(nc_max, 1), L_CMP=block, STRIDE=stride,
        SEL=sel_block, NSEL=num_selected, NUM_INIT=num_initial, NUM_LOCAL=num_local, WINDOW=window, W_SLOTS=W,
        NS_PAD=max(16, triton.next_power_of_2(ceil_div(S, sel_block))),
        R_OVL=triton.next_power_of_2(per_sel + per_cmp - 1), BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=num_warps)
    return (o, idx) if return_indices else o
