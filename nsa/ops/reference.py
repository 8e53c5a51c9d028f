"""Pure-PyTorch reference of every NSA op: the executable spec of docs/SPEC.md section 1.

Layout is [B, T, H, D] everywhere. Queries have HQ = G * H heads, keys and values H heads, and
query head hq belongs to kv head hq // G. All indices are 0-based.

Every Triton kernel in `nsa/ops` has a twin here with the same signature; the tests compare outputs
and gradients against these. They are written to be read, not to be fast: most build a dense
[T, S] boolean mask and run masked softmax attention through `attend`.
"""

import torch

from nsa.ops.common import ceil_div


def attend(q, k, v, mask, scale, gate=None):
    """Masked grouped-query attention, the one primitive every branch reduces to.

    q [B, T, HQ, D]; k, v [B, S, H, D]; mask bool, broadcastable to [B, H, G, T, S];
    gate (optional) multiplies the attention probabilities, same broadcast shape.
    Returns o [B, T, HQ, D] in q's dtype and lse [B, T, HQ] in fp32. A query that sees no key gets
    o = 0 and lse = -inf (never NaN, in the forward or the backward).
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    if k.shape[1] == 0:  # no keys at all (e.g. no memory and T < block): nothing to attend to
        lse = q.new_full((B, T, HQ), float("-inf"), dtype=torch.float32)
        return q * 0, lse  # q * 0 keeps the graph, so callers may still backpropagate
    qg = q.float().view(B, T, H, G, D)
    s = torch.einsum("bthgd,bshd->bhgts", qg, k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    # Softmax with an explicit, detached max so that fully masked rows stay finite: the result does
    # not depend on the shift, so detaching it changes no gradient.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)
    if gate is not None:
        p = p * gate
    o = torch.einsum("bhgts,bshd->bthgd", p, v.float())
    return o.reshape(B, T, HQ, D).to(q.dtype), lse.permute(0, 3, 1, 2).reshape(B, T, HQ)


def _mask5(mask_t_s):
    """[T, S] -> [1, 1, 1, T, S] for `attend`."""
    return mask_t_s[None, None, None]


def compressed_visibility(T, num_blocks, block, stride, num_mem, causal=True, device=None):
    """[T, num_mem + num_blocks] bool: which compressed keys query t sees.

    Memory keys always; compressed block i (tokens [i*stride, i*stride + block)) once its last
    token is not in the future: i*stride + block - 1 <= t.
    """
    t = torch.arange(T, device=device)
    last = torch.arange(num_blocks, device=device) * stride + block - 1
    vis = last[None, :] <= t[:, None] if causal else torch.ones(T, num_blocks, dtype=torch.bool, device=device)
    mem = torch.ones(T, num_mem, dtype=torch.bool, device=device)
    return torch.cat([mem, vis], dim=1)


def compressed_attention(q, ck, cv, p):
    """Attention over memory + compressed keys (p: `NSAParams`).

    q [B, T, HQ, D]; ck, cv [B, num_mem + N_c, H, D], the first num_mem rows being the memory keys.
    Returns (o [B, T, HQ, D], lse [B, T, HQ] fp32); lse is what block importance renormalises with.
    """
    T, D = q.shape[1], q.shape[3]
    vis = compressed_visibility(T, ck.shape[1] - p.num_mem, p.compress_block, p.compress_stride, p.num_mem,
                                p.causal, q.device)
    return attend(q, ck, cv, _mask5(vis), p.scale_for(D))


def overlap_matrix(num_cmp, num_sel, block, stride, sel_block, device=None):
    """c(i, j) [num_cmp, num_sel]: how many stride-sized chunks compressed block i and selection
    block j share. Compressed block i covers chunks [i, i + block/stride); selection block j covers
    chunks [j*sel_block/stride, (j+1)*sel_block/stride). This is the paper's Eq. 9, 0-based."""
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_sel, device=device)[None, :]
    per_cmp, per_sel = block // stride, sel_block // stride
    lo = torch.maximum(i, j * per_sel)
    hi = torch.minimum(i + per_cmp, (j + 1) * per_sel)
    return (hi - lo).clamp_min(0)


def block_importance(q, ck, lse, p):
    """Selection-block importance p_slc [B, T, Hs, N_s] in fp32, Hs = H if shared else HQ.

    p_cmp are the compression branch's softmax probabilities (recomputed from q, ck and its lse,
    memory keys dropped), mapped onto selection blocks by overlap and, if shared, summed over the
    G query heads of each kv head. N_s = ceil(T / sel_block).
    """
    B, T, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    num_cmp = ck.shape[1] - p.num_mem
    vis = compressed_visibility(T, num_cmp, p.compress_block, p.compress_stride, 0, p.causal, q.device)
    s = torch.einsum("bthgd,bshd->bthgs", q.float().view(B, T, H, G, D), ck[:, p.num_mem:].float()) * p.scale_for(D)
    lse_g = lse.view(B, T, H, G, 1)
    # Mask before exp: a row that sees no compressed block has lse = -inf, and exp(s - lse) = inf in
    # the discarded branch of a where would still send NaN (0 * inf) back through the gradient.
    p_cmp = torch.exp(torch.where(vis[None, :, None, None, :], s - lse_g, float("-inf")))
    C = overlap_matrix(num_cmp, ceil_div(T, p.sel_block), p.compress_block, p.compress_stride, p.sel_block,
                       q.device).float()
    p_slc = p_cmp @ C  # [B, T, H, G, N_s]
    return p_slc.sum(dim=3) if p.shared_selection else p_slc.reshape(B, T, HQ, -1)


def select_blocks(importance, p):
    """Top-n selection blocks per query [B, T, Hs, n] int32, ascending, -1 padded at the end.
    n, l', the forced blocks and causality come from p (`NSAParams`).

    Valid blocks for query t are j <= t // sel_block (all blocks if not causal). Forced: blocks
    j < num_initial and the num_local blocks ending at t // sel_block. The rest are the most important
    other valid blocks; ties go to the lower index.
    """
    B, T, Hs, N = importance.shape
    sel_block, num_selected, num_initial, num_local, causal = (p.sel_block, p.num_selected, p.num_initial,
                                                               p.num_local, p.causal)
    t = torch.arange(T, device=importance.device)[:, None]
    j = torch.arange(N, device=importance.device)[None, :]
    cur = t // sel_block
    valid = j <= cur if causal else torch.ones_like(j, dtype=torch.bool).expand(T, N)
    forced = valid & ((j < num_initial) | ((cur - j >= 0) & (cur - j < num_local)))
    score = importance.float().masked_fill(forced[None, :, None, :], float("inf"))
    score = score.masked_fill(~valid[None, :, None, :], float("-inf"))
    k = min(num_selected, N)
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    top_score, top_idx = torch.sort(score, dim=-1, descending=True, stable=True)
    top_idx = torch.where(top_score[..., :k] > float("-inf"), top_idx[..., :k], N)
    top_idx = top_idx.sort(dim=-1).values
    top_idx = torch.where(top_idx == N, -1, top_idx)
    pad = top_idx.new_full((B, T, Hs, num_selected - k), -1)
    return torch.cat([top_idx, pad], dim=-1).to(torch.int32)


def selected_token_mask(indices, T, S, sel_block, causal=True):
    """[B, T, Hs, S] bool from block indices [B, T, Hs, n]: key s is visible to query t iff its block
    s // sel_block is among t's selected blocks (and s <= t if causal)."""
    n_sel = ceil_div(S, sel_block)
    blocks = _scatter_blocks(indices, n_sel, torch.ones_like(indices, dtype=torch.bool))
    tok = blocks[..., torch.arange(S, device=indices.device) // sel_block]
    if causal:
        causal = torch.arange(S, device=indices.device)[None, :] <= torch.arange(T, device=indices.device)[:, None]
        tok = tok & causal[None, :, None, :]
    return tok


def _scatter_blocks(indices, n_sel, values):
    """Scatter per-(query, head) block values into [B, T, Hs, n_sel]; index -1 is dropped."""
    idx = torch.where(indices < 0, n_sel, indices).long()
    out = torch.zeros(*indices.shape[:-1], n_sel + 1, dtype=values.dtype, device=indices.device)
    return out.scatter(-1, idx, values)[..., :n_sel]


def _heads_first(x, H):
    """[B, T, Hs, S] -> [B, H, Hs // H or 1, T, S] to broadcast against `attend`'s [B, H, G, T, S]."""
    B, T, Hs, S = x.shape
    return x.view(B, T, H, Hs // H, S).permute(0, 2, 3, 1, 4)


def selection_attention(q, k, v, indices, p, block_gate=None):
    """Attention of each query over the tokens (<= t if causal) of its selected blocks.

    indices [B, T, Hs, n] int, -1 unused; Hs = H (one block set per kv head, shared by its G query
    heads) or HQ (per query head). block_gate [B, T, Hs, n] (optional) scales each block's
    attention weights; the straight-through top-n passes gates equal to 1 whose gradient reaches
    the importance scores.
    """
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    mask = _heads_first(selected_token_mask(indices, T, S, p.sel_block, p.causal), H)
    gate = None
    if block_gate is not None:
        g_blocks = _scatter_blocks(indices, ceil_div(S, p.sel_block), block_gate.float())
        gate = _heads_first(g_blocks[..., torch.arange(S, device=q.device) // p.sel_block], H)
    return attend(q, k, v, mask, p.scale_for(D), gate)[0]


def window_mask(T, S, window, causal=True, device=None):
    """[T, S] bool: causal keys (t - window, t]; bidirectional keys with |t - s| < window."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return ((t - s < window) & (s <= t)) if causal else ((t - s).abs() < window)


def sliding_window_attention(q, k, v, p):
    """Attention over the `p.window` most recent keys, the query's own token included."""
    T, D, S = q.shape[1], q.shape[3], k.shape[1]
    return attend(q, k, v, _mask5(window_mask(T, S, p.window, p.causal, q.device)), p.scale_for(D))[0]


def gate_mix(logits, o_cmp, o_slc, o_win):
    """The gated sum of the three branches: logits [B, T, 3 * HQ] (to_gates' output; for query head h,
    entries 3h, 3h + 1, 3h + 2 gate cmp, slc, win), o_* [B, T, HQ, D] -> [B, T, HQ, D] in o_cmp's dtype."""
    B, T, HQ, _ = o_cmp.shape
    g = torch.sigmoid(logits.view(B, T, HQ, 3, 1))
    return g[:, :, :, 0] * o_cmp + g[:, :, :, 1] * o_slc + g[:, :, :, 2] * o_win


def topn_blocks(q, ck, lse, p):
    """Importance + top-n in one call: the fused op the Triton kernel implements, which never stores
    the importance matrix."""
    return select_blocks(block_importance(q, ck, lse, p), p)


def dense_attention(q, k, v, scale=None, causal=True):
    """Full (causal) grouped-query attention: the dense baseline's spec."""
    T, D, S = q.shape[1], q.shape[3], k.shape[1]
    scale = D**-0.5 if scale is None else scale
    mask = window_mask(T, S, max(T, S) + 1, causal, q.device)
    return attend(q, k, v, _mask5(mask), scale)[0]



# ---------------------------------------------------------------------------------------------
# Decoding: one new query per sequence against preallocated caches (nsa/cache.py).


def ring_positions(t, slots):
    """[B, slots] int64: the token position held by each slot of a ring buffer of `slots` rows
    (position p lives in slot p % slots) once token t [B] is written; negative means empty."""
    s = torch.arange(slots, device=t.device)[None, :]
    t = t.long()[:, None]
    return t - torch.remainder(t - s, slots)


def decode_attention(q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t, p, return_indices=False):
    """One NSA decode step: the query of token t [B] (its keys already in the caches).

    q, q_rot [B, HQ, D]: the query without / with rotary (compressed branch / the other two).
    ck, cv [B, num_mem + N_max, H, D]: memory rows, then compressed block i at row num_mem + i
    (rows of blocks not yet complete are ignored). k_slc, v_slc [B, S, H, D]: rotated keys and values of
    positions 0..S-1 for selection. k_win, v_win [B, W, H, D]: the window branch's rotated keys and
    values in a ring, position p in slot p % W (W >= min(window, t + 1); W = S when it is the full cache).
    x [B, dim]: the layer's (normed) input; w_gate [3 * HQ, dim], b_gate [3 * HQ]: the gate projection,
    row 3 * h + branch (cmp, slc, win) for query head h: the gates are sigmoid(w_gate x + b_gate), in fp32.
    Returns o [B, HQ, D] in q's dtype (and the selected blocks [B, Hs, n] int32, ascending, -1 padded,
    with return_indices). Equals the parallel ops at row t, which is what the tests check.
    """
    B, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    block, stride, sel_block, num_mem = p.compress_block, p.compress_stride, p.sel_block, p.num_mem
    num_selected, num_initial, num_local, window = p.num_selected, p.num_initial, p.num_local, p.window
    scale = p.scale_for(D)
    t = t.long()
    num_cmp = ck.shape[1] - num_mem
    # Compressed branch: memory rows always, block i once i*stride + block - 1 <= t.
    last = torch.arange(num_cmp, device=q.device) * stride + block - 1
    vis = last[None, :] <= t[:, None]  # [B, N_max]
    vis_all = torch.cat([torch.ones(B, num_mem, dtype=torch.bool, device=q.device), vis], 1)
    o_cmp, lse = attend(q[:, None], ck, cv, vis_all[:, None, None, None, :], scale)
    # Importance: compressed probabilities (memory dropped) mapped onto selection blocks by overlap.
    S = k_slc.shape[1]
    n_sel = ceil_div(S, sel_block)
    s = torch.einsum("bhgd,bshd->bhgs", q.float().view(B, H, G, D), ck[:, num_mem:].float()) * scale
    p_cmp = torch.exp(torch.where(vis[:, None, None, :], s - lse.view(B, H, G, 1), float("-inf")))
    imp = p_cmp @ overlap_matrix(num_cmp, n_sel, block, stride, sel_block, q.device).float()
    imp = imp.sum(dim=2) if p.shared_selection else imp.reshape(B, HQ, n_sel)  # [B, Hs, n_sel]
    # Top-n: valid j <= t // sel_block; forced initial and local blocks; ties to the lower index.
    j = torch.arange(n_sel, device=q.device)[None, :]
    cur = (t // sel_block)[:, None]
    valid = j <= cur
    forced = valid & ((j < num_initial) | ((cur - j >= 0) & (cur - j < num_local)))
    score = imp.masked_fill(forced[:, None], float("inf")).masked_fill(~valid[:, None], float("-inf"))
    k = min(num_selected, n_sel)
    top_score, top_idx = torch.sort(score, dim=-1, descending=True, stable=True)
    top_idx = torch.where(top_score[..., :k] > float("-inf"), top_idx[..., :k], n_sel).sort(dim=-1).values
    idx = torch.where(top_idx == n_sel, -1, top_idx)
    idx = torch.cat([idx, idx.new_full((B, idx.shape[1], num_selected - k), -1)], -1).to(torch.int32)
    # Selected branch: tokens <= t of the selected blocks.
    picked = _scatter_blocks(idx[:, None], n_sel, torch.ones_like(idx[:, None], dtype=torch.bool))[:, 0]
    pos = torch.arange(S, device=q.device)
    tok = picked[..., pos // sel_block] & (pos[None, None, :] <= t[:, None, None])  # [B, Hs, S]
    o_slc = attend(q_rot[:, None], k_slc, v_slc, tok.view(B, H, -1, 1, S), scale)[0]
    # Window branch: the ring slots holding positions (t - window, t].
    held = ring_positions(t, k_win.shape[1])
    win = (held >= 0) & (t[:, None] - held < window)
    o_win = attend(q_rot[:, None], k_win, v_win, win[:, None, None, None, :], scale)[0]
    g = torch.sigmoid(torch.nn.functional.linear(x.float(), w_gate.float(), b_gate.float())).view(B, HQ, 3)
    o = g[..., 0:1] * o_cmp[:, 0].float() + g[..., 1:2] * o_slc[:, 0].float() + g[..., 2:3] * o_win[:, 0].float()
    o = o.to(q.dtype)
    return (o, idx) if return_indices else o

