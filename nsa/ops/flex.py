"""The `flex` backend: window and selection branches through PyTorch's flex attention (block-sparse
masks), the compressed branch, top-n, the gate mix and the decode step from the references.

Same signatures as the references. Flex skips the key tiles a block mask marks empty, so on GPU
these cost about what the mask covers, not T^2. On CPU flex runs eagerly (for tests).
"""

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from nsa.ops.common import ceil_div
from nsa.ops.reference import (_scatter_blocks, block_importance, compressed_attention, decode_attention, gate_mix,  # noqa: F401
                               topn_blocks)


@functools.cache
def _compiled_flex():
    # Uncompiled flex materialises the full score matrix; compiled it is a fused sparse kernel.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask_mod, B, Hm, scale):
    T, S = q.shape[1], k.shape[1]
    block_mask = create_block_mask(mask_mod, B, Hm, T, S, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
           enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def sliding_window_attention(q, k, v, p):
    window, causal = p.window, p.causal

    def mask_mod(b, h, t, s):
        return ((t - s < window) & (s <= t)) if causal else ((t - s).abs() < window)

    return _flex(q, k, v, mask_mod, None, None, p.scale_for(q.shape[-1]))


def selection_attention(q, k, v, indices, p, block_gate=None):
    if block_gate is not None:
        raise NotImplementedError("the flex backend has no straight-through block gate: use backend torch for "
                                  "diff_topk")
    B, T, HQ, D = q.shape
    sel_block, causal = p.sel_block, p.causal
    Hs = indices.shape[2]
    group = HQ // Hs  # query heads sharing one block set (G if shared, 1 if per head)
    sel = _scatter_blocks(indices, ceil_div(k.shape[1], sel_block), torch.ones_like(indices, dtype=torch.bool))
    sel = sel.transpose(1, 2).contiguous()  # [B, Hs, T, N_s]

    def mask_mod(b, h, t, s):
        picked = sel[b, h // group, t, s // sel_block]
        return (picked & (s <= t)) if causal else picked

    return _flex(q, k, v, mask_mod, B, HQ, p.scale_for(D))
