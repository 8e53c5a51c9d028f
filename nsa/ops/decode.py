"""Triton decode step: one query per sequence against the preallocated caches of `nsa.cache`.

`decode_attention` has the signature of `nsa.ops.reference.decode_attention`. It is split flash-decoding
style (split-K) into four small kernels so that even batch 1 fills the GPU; every grid size depends only
on static shapes (batch, heads, cache capacities), never on the current lengths, which each program
reads from the device tensor t and masks with. No host synchronisation: the step can be captured in a
CUDA graph.

Compressed block i covers the stride-chunks [i, i + l/d); selection block j covers [j*l'/d, (j+1)*l'/d).
The compressed keys are cut into *tiles* aligned to selection blocks: tile tau owns the SBT selection
blocks [tau*SBT, (tau+1)*SBT) and the CT = SBT*l'/d compressed blocks [tau*CT, (tau+1)*CT) that start
inside them. A compressed block overlaps at most the selection blocks of its own tile and the first
SPILL = ceil((l/d - 1) / (l'/d)) blocks of the next tile (its "spill").

1. `_k_partials`, grid (B*H, P1 + PW): programs c < P1 run the compressed attention of the G query heads of
   kv head h over the tiles c, c + P1, c + 2*P1, ... (and the memory rows, program 0), keeping an online
   softmax (m, l, acc) in fp32 that they write as one partial. For each tile they also write the
   un-normalised importance of its selection blocks, sum_i exp(s_gi - m_g) * c(i, j) per query head g
   (one small fp32 dot with the overlap matrix), the spill into the next tile, and the reference max m_g
   they are relative to. Programs c >= P1 each attend a chunk of the window (t - w, t] (a ring: position
   p in slot p % W) and write a partial too. The compressed keys are read once.
2. `_k_select`, grid (B*Hs, NJ): each program combines the P1 compressed partials into the log-sum-exp,
   finishes the importance of JB selection blocks (rescale each tile's values by exp(m_g - lse_g), add the
   spill of the previous tile, sum over the selection head's query heads), marks forced blocks (+inf) and
   invalid ones (j > t // l', -inf), and keeps a local top-n as int64 keys (importance bits << 32 | ~j):
   a key order is the reference order, importance descending and ties to the lower index.
3. `_k_selected`, grid (B*Hs, P3): every program merges the local top-n's (exact top-n of their union, n
   max passes over the keys), program 0 writes the indices, and program k attends to the picked blocks of
   ranks k, k + P3, ... (tokens <= t), writing one partial.
4. `_k_combine`, grid (B*HQ,): per query head, combines each branch's partials with the lse trick and
   writes g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

Any G works (query tiles are padded to a power of two >= 16). Offsets are int64.
"""

import os

import torch
import triton
import triton.language as tl

from nsa.ops.common import ceil_div

# Tuning knobs (the wrapper's keyword arguments override them; the tests make them small).
SEL_PER_TILE = 16  # SBT: selection blocks per compressed tile (>= 16: the importance is an fp32 dot)
TARGET_PROGRAMS_PER_SM = 4  # phase 1 and 3 split so that about this many programs run per SM
WINDOW_CHUNK = 128  # tokens of the window per phase-1 window program
SELECT_CHUNK = 128  # JB: selection blocks per phase-2 program (each keeps a local top-n)
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: no inf - inf


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
def _store_partial(PM, PL, PACC, slot, rows, rows_ok, m_i, l_i, acc, offs_d, D: tl.constexpr, G: tl.constexpr):
    """Write one partial (m, l, acc) of rows `rows` (query heads within the kv head) at `slot` ([.., G] base)."""
    off = slot * G + rows.to(tl.int64)
    tl.store(PM + off, m_i, mask=rows_ok)
    tl.store(PL + off, l_i, mask=rows_ok)
    a_off = off[:, None] * D + offs_d[None, :]
    tl.store(PACC + a_off, acc, mask=rows_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _cmp_part(Q, CK, CV, IMPL, MREF, SPL, PM, PL, PACC, b, h, c, t,
              sq_b, sq_h, sck_b, sck_r, sck_h, scale,
              H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NUM_MEM: tl.constexpr, NC: tl.constexpr,
              L_CMP: tl.constexpr, STRIDE: tl.constexpr, PER_CMP: tl.constexpr, PER_SEL: tl.constexpr,
              SBT: tl.constexpr, CT: tl.constexpr, NT: tl.constexpr, SPILL: tl.constexpr, P1: tl.constexpr,
              NPART: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, BD)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q_off = b * sq_b + (h * G + offs_g)[:, None].to(tl.int64) * sq_h + offs_d[None, :]
    q = tl.load(Q + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    ck_base = CK + b * sck_b + h * sck_h
    cv_base = CV + b * sck_b + h * sck_h
    m_i = tl.full([BG], _NEG, tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    if NUM_MEM > 0:  # memory rows: always visible, program 0 only, no importance
        r = tl.arange(0, BM)
        r_ok = r < tl.where(c == 0, NUM_MEM, 0)  # (no "& scalar bool": the 3.9 interpreter mis-types it)
        m_off = r[:, None].to(tl.int64) * sck_r + offs_d[None, :]
        m_mask = r_ok[:, None] & d_ok[None, :]
        k_m = tl.load(ck_base + m_off, mask=m_mask, other=0.0)
        v_m = tl.load(cv_base + m_off, mask=m_mask, other=0.0)
        m_i, l_i, acc = _online_tile(q, k_m, v_m, r_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
    n_vis = tl.where(t + 1 >= L_CMP, (t + 1 - L_CMP) // STRIDE + 1, 0)
    n_vis = tl.minimum(n_vis, NC)
    nt_vis = (n_vis + CT - 1) // CT
    # Overlap c(i, j) of the tile's compressed blocks il with its selection blocks jl (the same for every
    # tile, as tiles are aligned to selection blocks), and with the first SPILL blocks of the next tile.
    il = tl.arange(0, BN)
    jl = tl.arange(0, SBT)
    lo = tl.maximum(il[:, None], jl[None, :] * PER_SEL)
    hi = tl.minimum(il[:, None] + PER_CMP, (jl[None, :] + 1) * PER_SEL)
    cmat = tl.maximum(hi - lo, 0).to(tl.float32)
    bh = b * H + h
    for tau in range(c, nt_vis, P1):
        i = tau * CT + il
        i_ok = (il < CT) & (i < n_vis)
        kv_off = (NUM_MEM + i)[:, None].to(tl.int64) * sck_r + offs_d[None, :]
        kv_mask = i_ok[:, None] & d_ok[None, :]
        k = tl.load(ck_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(cv_base + kv_off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        s = tl.where(i_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
        # importance of the tile's selection blocks relative to m_new (fp32, exact products)
        imp = tl.dot(p, cmat, input_precision="ieee")  # [BG, SBT]
        row = (bh * NT + tau) * G + offs_g.to(tl.int64)  # [BG]
        tl.store(IMPL + row[:, None] * SBT + jl[None, :], imp, mask=g_ok[:, None])
        tl.store(MREF + row, m_new, mask=g_ok)
        for sp in tl.static_range(SPILL):
            lo_s = tl.maximum(il, (SBT + sp) * PER_SEL)
            hi_s = tl.minimum(il + PER_CMP, (SBT + sp + 1) * PER_SEL)
            c_s = tl.maximum(hi_s - lo_s, 0).to(tl.float32)
            tl.store(SPL + row * SPILL + sp, tl.sum(p * c_s[None, :], axis=1), mask=g_ok)
    _store_partial(PM, PL, PACC, bh * NPART + c, offs_g, g_ok, m_i, l_i, acc, offs_d, D, G)


@triton.jit
def _win_part(QR, KW, VW, PM, PL, PACC, b, h, c, t, sq_b, sq_h, skw_b, skw_s, skw_h, scale,
              H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr, W_SLOTS: tl.constexpr,
              WCH: tl.constexpr, P1: tl.constexpr, NPART: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr,
              BW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, BD)
    offs_n = tl.arange(0, BW)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q_off = b * sq_b + (h * G + offs_g)[:, None].to(tl.int64) * sq_h + offs_d[None, :]
    qr = tl.load(QR + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    kw_base = KW + b * skw_b + h * skw_h
    vw_base = VW + b * skw_b + h * skw_h
    m_i = tl.full([BG], _NEG, tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    w_lo = tl.maximum(t - WINDOW + 1, 0) + (c - P1) * WCH
    w_hi = tl.minimum(w_lo + WCH, t + 1)
    for start in range(w_lo, w_hi, BW):
        p_idx = start + offs_n
        p_ok = p_idx < w_hi
        slot = p_idx % W_SLOTS
        kv_off = slot[:, None].to(tl.int64) * skw_s + offs_d[None, :]
        kv_mask = p_ok[:, None] & d_ok[None, :]
        k = tl.load(kw_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(vw_base + kv_off, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_tile(qr, k, v, p_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
    _store_partial(PM, PL, PACC, (b * H + h) * NPART + c, offs_g, g_ok, m_i, l_i, acc, offs_d, D, G)


@triton.jit
def _k_partials(
    Q, QR, CK, CV, KW, VW, TPOS, IMPL, MREF, SPL, PM, PL, PACC,
    sq_b, sq_h, sck_b, sck_r, sck_h, skw_b, skw_s, skw_h, scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NUM_MEM: tl.constexpr, NC: tl.constexpr,
    L_CMP: tl.constexpr, STRIDE: tl.constexpr, PER_CMP: tl.constexpr, PER_SEL: tl.constexpr, SBT: tl.constexpr,
    CT: tl.constexpr, NT: tl.constexpr, SPILL: tl.constexpr, P1: tl.constexpr, NPART: tl.constexpr,
    WINDOW: tl.constexpr, W_SLOTS: tl.constexpr, WCH: tl.constexpr,
    BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tl.load(TPOS + b).to(tl.int32)
    if c < P1:
        _cmp_part(Q, CK, CV, IMPL, MREF, SPL, PM, PL, PACC, b, h, c, t, sq_b, sq_h, sck_b, sck_r, sck_h, scale,
                  H, G, D, NUM_MEM, NC, L_CMP, STRIDE, PER_CMP, PER_SEL, SBT, CT, NT, SPILL, P1, NPART,
                  BG, BD, BN, BM, PREC, UPCAST)
    else:
        _win_part(QR, KW, VW, PM, PL, PACC, b, h, c, t, sq_b, sq_h, skw_b, skw_s, skw_h, scale,
                  H, G, D, WINDOW, W_SLOTS, WCH, P1, NPART, BG, BD, BW, PREC, UPCAST)


@triton.jit
def _k_select(
    TPOS, PM, PL, IMPL, MREF, SPL, CAND,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, NC: tl.constexpr, L_CMP: tl.constexpr,
    STRIDE: tl.constexpr, SEL: tl.constexpr, NS: tl.constexpr, SBT: tl.constexpr, CT: tl.constexpr,
    NT: tl.constexpr, SPILL: tl.constexpr, P1: tl.constexpr, NPART: tl.constexpr, NUM_INIT: tl.constexpr,
    NUM_LOCAL: tl.constexpr, NJ: tl.constexpr, JB: tl.constexpr, NLOC: tl.constexpr,
    BG: tl.constexpr, BP: tl.constexpr,
):
    bs = tl.program_id(0)
    jc = tl.program_id(1)
    b = bs // HS
    hs = bs % HS
    hq0 = hs * GS
    h = hq0 // G
    g0 = hq0 % G
    bh = (b * (HS * GS // G) + h).to(tl.int64)  # b * H + h
    t = tl.load(TPOS + b).to(tl.int32)
    offs_g = tl.arange(0, BG)
    g_ok = offs_g < GS
    rows = (g0 + offs_g).to(tl.int64)
    # log-sum-exp of the compressed branch from the P1 partials (memory rows included)
    offs_p = tl.arange(0, BP)
    p_off = (bh * NPART + offs_p)[None, :] * G + rows[:, None]
    p_mask = g_ok[:, None] & (offs_p[None, :] < P1)
    pm = tl.load(PM + p_off, mask=p_mask, other=_NEG)
    pl = tl.load(PL + p_off, mask=p_mask, other=0.0)
    mx = tl.max(pm, axis=1)
    lsum = tl.sum(pl * tl.exp(pm - mx[:, None]), axis=1)
    lse = tl.where(lsum > 0, mx + tl.log(tl.where(lsum > 0, lsum, 1.0)), 0.0)  # 0: nothing visible, no use
    # importance of selection blocks j = jc*JB + offs_j
    n_vis = tl.where(t + 1 >= L_CMP, (t + 1 - L_CMP) // STRIDE + 1, 0)
    n_vis = tl.minimum(n_vis, NC)
    nt_vis = (n_vis + CT - 1) // CT
    offs_j = tl.arange(0, JB)
    j = jc * JB + offs_j
    tau = j // SBT
    jl = j % SBT
    row = (bh * NT + tau)[None, :] * G + rows[:, None]  # [BG, JB]
    own = g_ok[:, None] & (tau < nt_vis)[None, :]
    mref = tl.load(MREF + row, mask=own, other=0.0)
    val = tl.load(IMPL + row * SBT + jl[None, :], mask=own, other=0.0)
    imp = tl.where(own, val * tl.exp(mref - lse[:, None]), 0.0)
    if SPILL > 0:  # the previous tile's compressed blocks that reach into this tile's first blocks
        prev = g_ok[:, None] & ((tau >= 1) & (tau - 1 < nt_vis) & (jl < SPILL))[None, :]
        row_p = row - G
        mref_p = tl.load(MREF + row_p, mask=prev, other=0.0)
        val_p = tl.load(SPL + row_p * SPILL + jl[None, :], mask=prev, other=0.0)
        imp += tl.where(prev, val_p * tl.exp(mref_p - lse[:, None]), 0.0)
    imp = tl.sum(imp, axis=0)
    cur = t // SEL
    valid = (j <= cur) & (j < NS)
    forced = valid & ((j < NUM_INIT) | ((cur - j >= 0) & (cur - j < NUM_LOCAL)))
    imp = tl.where(forced, float("inf"), imp)
    # key: importance bits (>= 0, so ordered as integers) << 32 | (2^31 - 1 - j): descending key order is
    # importance descending, ties to the lower index; invalid blocks -1.
    bits = imp.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(valid, (bits << 32) + (2147483647 - j).to(tl.int64), -1)
    c_base = CAND + (bs.to(tl.int64) * NJ + jc) * NLOC
    for n in range(NLOC):
        best = tl.max(key, axis=0)
        tl.store(c_base + n, best)
        key = tl.where(key == best, -1, key)


@triton.jit
def _k_selected(
    QR, KS, VS, TPOS, CAND, IDX, PM, PL, PACC,
    sq_b, sq_h, sks_b, sks_s, sks_h, scale,
    HS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SEL: tl.constexpr,
    NSEL: tl.constexpr, NCAND: tl.constexpr, P3: tl.constexpr, SLOT0: tl.constexpr, NPART: tl.constexpr,
    BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    bs = tl.program_id(0)
    k3 = tl.program_id(1)
    b = (bs // HS).to(tl.int64)
    hs = bs % HS
    hq0 = hs * GS
    h = (hq0 // G).to(tl.int64)
    g0 = hq0 % G
    t = tl.load(TPOS + b).to(tl.int32)
    # exact top-n of the union of the local top-n's
    offs_c = tl.arange(0, BC)
    key = tl.load(CAND + bs.to(tl.int64) * NCAND + offs_c, mask=offs_c < NCAND, other=-1)
    offs_r = tl.arange(0, BR)
    picked = tl.full([BR], -1, tl.int32)
    for n in range(NSEL):
        best = tl.max(key, axis=0)
        key = tl.where(key == best, -1, key)
        jb = (2147483647 - (best - ((best >> 32) << 32))).to(tl.int32)
        picked = tl.where(offs_r == n, tl.where(best >= 0, jb, -1), picked)
    tl.store(IDX + bs.to(tl.int64) * NSEL + offs_r, picked, mask=offs_r < tl.where(k3 == 0, NSEL, 0))
    # attention over the picked blocks of ranks k3, k3 + P3, ...
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    g_ok = offs_g < GS
    d_ok = offs_d < D
    q_off = b * sq_b + (hq0 + offs_g)[:, None].to(tl.int64) * sq_h + offs_d[None, :]
    qr = tl.load(QR + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    ks_base = KS + b * sks_b + h * sks_h
    vs_base = VS + b * sks_b + h * sks_h
    m_i = tl.full([BG], _NEG, tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    for u in range(k3, NSEL, P3):
        jb = tl.sum(tl.where(offs_r == u, picked, 0), axis=0)
        tok_lo = jb * SEL
        tok_hi = tl.where(jb >= 0, tl.minimum(tok_lo + SEL, t + 1), tok_lo)
        if SEL <= BN:  # one tile per block (the usual case): a flat loop the compiler pipelines
            s_idx = tok_lo + offs_n
            s_ok = s_idx < tok_hi
            kv_off = s_idx[:, None].to(tl.int64) * sks_s + offs_d[None, :]
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(ks_base + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(vs_base + kv_off, mask=kv_mask, other=0.0)
            m_i, l_i, acc = _online_tile(qr, k, v, s_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
        else:
            for start in range(tok_lo, tok_hi, BN):
                s_idx = start + offs_n
                s_ok = s_idx < tok_hi
                kv_off = s_idx[:, None].to(tl.int64) * sks_s + offs_d[None, :]
                kv_mask = s_ok[:, None] & d_ok[None, :]
                k = tl.load(ks_base + kv_off, mask=kv_mask, other=0.0)
                v = tl.load(vs_base + kv_off, mask=kv_mask, other=0.0)
                m_i, l_i, acc = _online_tile(qr, k, v, s_ok[None, :], m_i, l_i, acc, scale, PREC, UPCAST)
    _store_partial(PM, PL, PACC, (b * (HS * GS // G) + h) * NPART + SLOT0 + k3, g0 + offs_g, g_ok,
                   m_i, l_i, acc, offs_d, D, G)


@triton.jit
def _branch(m, l, acc, in_seg):
    mx = tl.max(tl.where(in_seg, m, _NEG), axis=0)
    w = tl.where(in_seg, tl.exp(tl.where(in_seg, m, mx) - mx), 0.0)
    lsum = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0)
    return o / tl.where(lsum > 0, lsum, 1.0)


@triton.jit
def _k_combine(
    PM, PL, PACC, GATES, O, sg_b, sg_h, so_b, so_h,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P1: tl.constexpr, PW: tl.constexpr,
    NPART: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    hq = pid % HQ
    h = hq // G
    g = hq % G
    offs_p = tl.arange(0, BP)
    offs_d = tl.arange(0, BD)
    p_ok = offs_p < NPART
    off = ((b * (HQ // G) + h) * NPART + offs_p) * G + g
    m = tl.load(PM + off, mask=p_ok, other=_NEG)
    l = tl.load(PL + off, mask=p_ok, other=0.0)
    acc = tl.load(PACC + off[:, None] * D + offs_d[None, :], mask=p_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    o_cmp = _branch(m, l, acc, offs_p < P1)
    o_win = _branch(m, l, acc, (offs_p >= P1) & (offs_p < P1 + PW))
    o_slc = _branch(m, l, acc, (offs_p >= P1 + PW) & p_ok)
    g_off = b * sg_b + hq.to(tl.int64) * sg_h
    gate_cmp = tl.load(GATES + g_off + 0).to(tl.float32)
    gate_slc = tl.load(GATES + g_off + 1).to(tl.float32)
    gate_win = tl.load(GATES + g_off + 2).to(tl.float32)
    out = gate_cmp * o_cmp + gate_slc * o_slc + gate_win * o_win
    tl.store(O + b * so_b + hq.to(tl.int64) * so_h + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)


_SM_COUNT = {}


def _num_sms(device):
    if device.type != "cuda":
        return 132
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _pow2_floor(x):
    return 1 << (max(1, int(x)).bit_length() - 1)


def decode_attention(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t, block, stride, sel_block,
                     num_mem, num_selected, num_initial=1, num_local=2, window=512, shared=True, scale=None,
                     return_indices=False, block_n=None, num_warps=None, sel_per_tile=None, cmp_splits=None,
                     window_chunk=None, select_chunk=None, sel_splits=None):
    """Triton twin of `nsa.ops.reference.decode_attention` (see there for shapes). The selected block
    indices it returns (return_indices) are in the order picked (importance descending), not sorted.

    Tuning (all optional, default from the module constants and the GPU's SM count; grid sizes depend only
    on shapes): block_n key tile of the window and selected branches; num_warps; sel_per_tile selection
    blocks per compressed tile (>= 16); cmp_splits programs per (sequence, kv head) for the compressed
    branch; window_chunk tokens per window program; select_chunk selection blocks per top-n program;
    sel_splits programs per (sequence, selection head) for the selected blocks."""
    B, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    scale = D**-0.5 if scale is None else scale
    Hs = H if shared else HQ
    GS = HQ // Hs
    S, W = k_slc.shape[1], k_win.shape[1]
    NC = ck.shape[1] - num_mem
    for x in (ck, cv, k_slc, v_slc, k_win, v_win):
        if x.stride(-1) != 1:
            raise ValueError("decode caches must have a contiguous last dimension")
    if k_slc.stride() != v_slc.stride() or k_win.stride() != v_win.stride() or ck.stride() != cv.stride():
        raise ValueError("decode caches: keys and values must share strides")
    if block % stride or sel_block % stride:
        raise ValueError("compress stride must divide the compress block and the selection block")
    q, q_rot, gates = q.contiguous(), q_rot.contiguous(), gates.contiguous()
    t = t.to(torch.int32) if t.dtype != torch.int32 else t
    dev = q.device
    n_sms = _num_sms(dev)
    target = TARGET_PROGRAMS_PER_SM * n_sms

    per_cmp, per_sel = block // stride, sel_block // stride
    sbt = max(16, triton.next_power_of_2(sel_per_tile or SEL_PER_TILE))
    ct = sbt * per_sel  # compressed blocks per tile
    spill = ceil_div(per_cmp - 1, per_sel)  # selection blocks of the next tile a compressed block reaches
    if spill > sbt:
        raise ValueError("compress block too long for the selection tile (raise sel_per_tile)")
    nt = max(1, ceil_div(NC, ct))
    p1 = cmp_splits or min(nt, _pow2_floor(ceil_div(target, B * H)))
    p1 = max(1, min(p1, nt))
    wch = window_chunk or WINDOW_CHUNK
    BW = block_n or 64
    wch = ceil_div(wch, BW) * BW
    pw = ceil_div(min(window, W), wch)
    ns = ceil_div(S, sel_block)
    jb = min(triton.next_power_of_2(select_chunk or SELECT_CHUNK), triton.next_power_of_2(ns))
    nj = ceil_div(ns, jb)
    nloc = min(num_selected, jb)
    p3 = sel_splits or min(num_selected, triton.next_power_of_2(ceil_div(target // 2, B * Hs)))
    p3 = max(1, min(p3, num_selected))
    npart = p1 + pw + p3

    # one fp32 workspace: partials (m, l, acc) of every branch, tile importance, reference max and spill
    sizes = [B * H * npart * G, B * H * npart * G, B * H * npart * G * D, B * H * nt * G * sbt, B * H * nt * G,
             B * H * nt * G * max(spill, 1)]
    ws = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
    pm, pl, pacc, impl, mref, spl = torch.split(ws, sizes)
    cand = torch.empty(B * Hs * nj * nloc, dtype=torch.int64, device=dev)
    idx = torch.empty(B, Hs, num_selected, dtype=torch.int32, device=dev)
    o = torch.empty_like(q)

    BG = max(16, triton.next_power_of_2(G))
    BD = max(16, triton.next_power_of_2(D))
    if num_warps is None:
        num_warps = 4 if BG * BD <= 16 * 128 else 8
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = os.environ.get("TRITON_INTERPRET") == "1"
    _k_partials[(B * H, p1 + pw)](
        q, q_rot, ck, cv, k_win, v_win, t, impl, mref, spl, pm, pl, pacc,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2),
        k_win.stride(0), k_win.stride(1), k_win.stride(2), float(scale),
        H=H, G=G, D=D, NUM_MEM=num_mem, NC=max(NC, 0), L_CMP=block, STRIDE=stride, PER_CMP=per_cmp,
        PER_SEL=per_sel, SBT=sbt, CT=ct, NT=nt, SPILL=spill, P1=p1, NPART=npart, WINDOW=window, W_SLOTS=W,
        WCH=wch, BG=BG, BD=BD, BN=triton.next_power_of_2(ct), BM=max(16, triton.next_power_of_2(max(num_mem, 1))),
        BW=BW, PREC=prec, UPCAST=upcast, num_warps=num_warps)
    _k_select[(B * Hs, nj)](
        t, pm, pl, impl, mref, spl, cand,
        HS=Hs, GS=GS, G=G, NC=max(NC, 0), L_CMP=block, STRIDE=stride, SEL=sel_block, NS=ns, SBT=sbt, CT=ct, NT=nt,
        SPILL=spill, P1=p1, NPART=npart, NUM_INIT=num_initial, NUM_LOCAL=num_local, NJ=nj, JB=jb, NLOC=nloc,
        BG=triton.next_power_of_2(GS), BP=triton.next_power_of_2(p1), num_warps=4)
    BG3 = max(16, triton.next_power_of_2(GS))
    _k_selected[(B * Hs, p3)](
        q_rot, k_slc, v_slc, t, cand, idx, pm, pl, pacc,
        q_rot.stride(0), q_rot.stride(1), k_slc.stride(0), k_slc.stride(1), k_slc.stride(2), float(scale),
        HS=Hs, GS=GS, G=G, D=D, SEL=sel_block, NSEL=num_selected, NCAND=nj * nloc, P3=p3, SLOT0=p1 + pw,
        NPART=npart, BG=BG3, BD=BD, BN=block_n or min(128, triton.next_power_of_2(sel_block)),
        BC=triton.next_power_of_2(nj * nloc), BR=triton.next_power_of_2(num_selected), PREC=prec, UPCAST=upcast,
        num_warps=4 if BG3 * BD <= 16 * 128 else 8)
    _k_combine[(B * HQ,)](
        pm, pl, pacc, gates, o, gates.stride(0), gates.stride(1), o.stride(0), o.stride(1),
        HQ=HQ, G=G, D=D, P1=p1, PW=pw, NPART=npart, BP=triton.next_power_of_2(npart), BD=BD, num_warps=4)
    return (o, idx) if return_indices else o
