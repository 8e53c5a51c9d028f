"""The `torch` backend: the reference ops (nsa/ops/reference.py) computed a chunk of queries at a time.

Same signatures and, up to float rounding, the same outputs and gradients as the references (the tests
hold them equal), but no op builds a [T, T] tensor:

- compressed attention, block importance and top-n: a chunk of queries against the memory and T/d
  compressed keys ([chunk, N_c] scores);
- selection: each query gathers its n selected blocks (n * l' keys), one contiguous row per block;
- window: local-attention's bucketed attention ([T, 2w] scores; 3w bidirectional), a chunk of
  (batch, kv head) rows at a time; it has no GQA, so a chunk's keys are repeated over the G query
  heads of their kv head.

Chunk sizes come from the shapes alone (CHUNK_ELEMENTS bounds a chunk's largest intermediate), so the
loops are static and torch.compile unrolls them. Every chunk runs under torch.utils.checkpoint: the
backward recomputes a chunk's scores instead of keeping them, so forward and backward hold the ops'
inputs and outputs plus one chunk's intermediates, and no tensor exceeds O(T * (w + n l' + T / d))
elements per head (block_importance's own [T, N_s] output included).
"""

import torch
import torch.nn.functional as F
from local_attention import LocalAttention
from torch.utils.checkpoint import checkpoint

from nsa.ops.common import ceil_div
from nsa.ops.reference import attend, decode_attention, gate_mix, overlap_matrix  # noqa: F401 (decode, gate mix: as is)

CHUNK_ELEMENTS = 1 << 22  # elements in a chunk's largest intermediate (16 MiB in fp32)


def _rows(per_row):
    """Rows per chunk when each row's largest intermediate has per_row elements."""
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


def _spans(T, per_row):
    """[(start, stop)] query ranges of _rows(per_row) rows covering 0..T-1."""
    rows = _rows(per_row)
    return [(a, min(a + rows, T)) for a in range(0, T, rows)]


def _checkpointed(fn, *args):
    # No randomness inside, so the RNG state need not be saved for the recomputation.
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _cmp_visible(start, stop, num_cmp, p, device):
    """[stop - start, num_cmp] bool: compressed block i is visible to query t once i*d + l - 1 <= t."""
    t = torch.arange(start, stop, device=device)[:, None]
    last = torch.arange(num_cmp, device=device)[None, :] * p.compress_stride + p.compress_block - 1
    return last <= t if p.causal else torch.ones(stop - start, num_cmp, dtype=torch.bool, device=device)


# --- Compressed branch ---------------------------------------------------------------------------


def _compressed_chunk(q, ck, cv, start, p):
    C = q.shape[1]
    vis = _cmp_visible(start, start + C, ck.shape[1] - p.num_mem, p, q.device)
    vis = torch.cat([vis.new_ones(C, p.num_mem), vis], 1)  # memory keys: always visible
    return attend(q, ck, cv, vis[None, None, None], p.scale_for(q.shape[-1]))


def compressed_attention(q, ck, cv, p):
    """Attention over memory + compressed keys: (o [B, T, HQ, D], lse [B, T, HQ] fp32)."""
    B, T, HQ, _ = q.shape
    parts = [_checkpointed(_compressed_chunk, q[:, a:b], ck, cv, a, p) for a, b in _spans(T, B * HQ * ck.shape[1])]
    return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 1)


# --- Importance and top-n ------------------------------------------------------------------------


def _importance_chunk(q, ck, lse, overlap, start, p):
    """Rows start.. of block_importance: [B, C, Hs, N_s] fp32."""
    B, C, HQ, D = q.shape
    H = ck.shape[2]
    G = HQ // H
    vis = _cmp_visible(start, start + C, ck.shape[1] - p.num_mem, p, q.device)[None, :, None, None, :]
    s = torch.einsum("bthgd,bshd->bthgs", q.float().view(B, C, H, G, D), ck[:, p.num_mem:].float())
    # Mask before exp: a query that saw no key has lse = -inf, and exp(s - lse) would be inf (NaN gradient).
    logp = torch.where(vis, s * p.scale_for(D) - lse.view(B, C, H, G, 1), float("-inf"))
    p_slc = torch.exp(logp) @ overlap  # [B, C, H, G, N_s]
    return p_slc.sum(dim=3) if p.shared_selection else p_slc.reshape(B, C, HQ, -1)


def _overlap(q, ck, p):
    num_cmp = ck.shape[1] - p.num_mem
    num_sel = ceil_div(q.shape[1], p.sel_block)
    return overlap_matrix(num_cmp, num_sel, p.compress_block, p.compress_stride, p.sel_block, q.device).float()


def _importance_spans(q, ck, p):
    B, T, HQ, _ = q.shape
    return _spans(T, B * HQ * max(ck.shape[1], ceil_div(T, p.sel_block)))


def block_importance(q, ck, lse, p):
    """Selection-block importance p_slc [B, T, Hs, N_s] fp32 (Hs = H if shared else HQ)."""
    overlap = _overlap(q, ck, p)
    return torch.cat([_checkpointed(_importance_chunk, q[:, a:b], ck, lse[:, a:b], overlap, a, p)
                      for a, b in _importance_spans(q, ck, p)], 1)


def _top_n(importance, start, p):
    """The reference's select_blocks for the queries at rows start.. (importance [B, C, Hs, N])."""
    B, C, Hs, N = importance.shape
    t = torch.arange(start, start + C, device=importance.device)[:, None]
    j = torch.arange(N, device=importance.device)[None, :]
    cur = t // p.sel_block
    valid = j <= cur if p.causal else torch.ones(C, N, dtype=torch.bool, device=importance.device)
    forced = valid & ((j < p.num_initial) | ((cur - j >= 0) & (cur - j < p.num_local)))
    score = importance.masked_fill(forced[None, :, None], float("inf"))
    score = score.masked_fill(~valid[None, :, None], float("-inf"))
    k = min(p.num_selected, N)
    top_score, top_idx = torch.sort(score, dim=-1, descending=True, stable=True)  # ties: lower index first
    top_idx = torch.where(top_score[..., :k] > float("-inf"), top_idx[..., :k], N).sort(dim=-1).values
    top_idx = torch.where(top_idx == N, -1, top_idx)
    return torch.cat([top_idx, top_idx.new_full((B, C, Hs, p.num_selected - k), -1)], -1).to(torch.int32)


def topn_blocks(q, ck, lse, p):
    """Top-n selection blocks [B, T, Hs, n] int32 (ascending, -1 padded), one chunk's importance at a
    time: the full importance matrix is never stored."""
    overlap = _overlap(q, ck, p)
    return torch.cat([_top_n(_importance_chunk(q[:, a:b], ck, lse[:, a:b], overlap, a, p), a, p)
                      for a, b in _importance_spans(q, ck, p)], 1)


# --- Selection branch ----------------------------------------------------------------------------


def _block_rows(x, sel_block):
    """[B, S, H, D] -> [B * H * N_s, l' * D], the tail zero-padded: each selection block of each kv head
    is one contiguous row, so gathering a selected block is one index_select row."""
    B, S, H, D = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, ceil_div(S, sel_block) * sel_block - S))
    return x.view(B, -1, sel_block, H, D).permute(0, 3, 1, 2, 4).reshape(-1, sel_block * D)


def _selection_chunk(q, k_rows, v_rows, indices, block_gate, start, S, H, p):
    """Rows start.. of selection_attention: every (query, block set) attends to its own gathered blocks."""
    B, C, HQ, D = q.shape
    Hs, n = indices.shape[2], indices.shape[3]
    group = HQ // Hs  # query heads sharing one block set
    blk = indices.long()
    pos = blk[..., None] * p.sel_block + torch.arange(p.sel_block, device=q.device)  # [B, C, Hs, n, l']
    seen = (blk[..., None] >= 0) & (pos < S)
    if p.causal:
        seen = seen & (pos <= torch.arange(start, start + C, device=q.device)[None, :, None, None, None])
    head = torch.arange(Hs, device=q.device) // (Hs // H)  # the kv head of each block set
    rows = (torch.arange(B, device=q.device)[:, None, None, None] * H + head[:, None]) * ceil_div(S, p.sel_block)
    rows = (rows + blk.clamp_min(0)).flatten()  # unused slots (-1) read block 0, masked out by `seen`
    k_sel, v_sel = k_rows.index_select(0, rows), v_rows.index_select(0, rows)  # [B * C * Hs * n, l' * D]
    # attend() with one query position per (b, t, block set): that set's `group` heads over its keys.
    R, L = B * C * Hs, n * p.sel_block
    gate = None
    if block_gate is not None:
        gate = block_gate.float()[..., None].expand(B, C, Hs, n, p.sel_block).reshape(R, 1, 1, 1, L)
    o, _ = attend(q.reshape(R, 1, group, D), k_sel.reshape(R, L, 1, D), v_sel.reshape(R, L, 1, D),
                  seen.reshape(R, 1, 1, 1, L), p.scale_for(D), gate)
    return o.reshape(B, C, HQ, D)


def selection_attention(q, k, v, indices, p, block_gate=None):
    """Attention of each query over the tokens (<= t if causal) of its selected blocks.

    indices [B, T, Hs, n] int, -1 unused, distinct within a row (as topn_blocks gives them); Hs = H
    (shared by each kv head's G query heads) or HQ. block_gate [B, T, Hs, n] (optional) scales each
    block's attention weights.
    """
    B, T = q.shape[:2]
    Hs, n = indices.shape[2], indices.shape[3]
    k_rows, v_rows = _block_rows(k, p.sel_block), _block_rows(v, p.sel_block)
    spans = _spans(T, B * Hs * n * p.sel_block * q.shape[-1])
    return torch.cat([_checkpointed(_selection_chunk, q[:, a:b], k_rows, v_rows, indices[:, a:b],
                                    None if block_gate is None else block_gate[:, a:b], a, k.shape[1], k.shape[2], p)
                      for a, b in spans], 1)


# --- Window branch -------------------------------------------------------------------------------


def _local_attention(T, p, scale):
    """local-attention's LocalAttention computing keys (t - w, t] (causal) or |t - s| < w exactly.

    With exact_windowsize it keeps t - s <= window_size * look_backward (and s - t <= window_size *
    look_forward), so buckets of w - 1 looking one bucket back give the w keys (t - w, t]. w = 1 (the
    query's own key only) is buckets of 1 looking nowhere. A window past T is the same as w = T and
    avoids padding T up to w.
    """
    w = min(p.window, T)
    size, look = (w - 1, 1) if w > 1 else (1, 0)
    return LocalAttention(window_size=size, causal=p.causal, look_backward=look, look_forward=0 if p.causal else look,
                          exact_windowsize=True, autopad=True, scale=scale)


def _window_chunk(q, k, v, p):
    """q [R, G, T, D], k, v [R, T, D] (R (batch, kv head) rows) -> [R, G, T, D] in fp32."""
    R, G, T, D = q.shape
    k, v = (x.float()[:, None].expand(R, G, T, D) for x in (k, v))
    # Non-causal: autopad's padded tail keys would be visible to the last queries unless masked.
    mask = None if p.causal else torch.ones(1, T, dtype=torch.bool, device=q.device)
    return _local_attention(T, p, p.scale_for(D))(q.float(), k, v, mask=mask)


def sliding_window_attention(q, k, v, p):
    """Attention over the `p.window` most recent keys, the query's own token included."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    qr = q.view(B, T, H, G, D).permute(0, 2, 3, 1, 4).reshape(B * H, G, T, D)
    kr, vr = (x.permute(0, 2, 1, 3).reshape(B * H, T, D) for x in (k, v))
    rows = _rows(G * T * 3 * min(p.window, T))  # scores: [G, T, <= 3w] per (batch, kv head) row
    o = torch.cat([_checkpointed(_window_chunk, qr[a:a + rows], kr[a:a + rows], vr[a:a + rows], p)
                   for a in range(0, B * H, rows)])
    return o.view(B, H, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, HQ, D).to(q.dtype)
