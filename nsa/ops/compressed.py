"""Compressed-branch attention on the range-attention kernel (`nsa.ops.range_attention`).

Reference twin: `nsa.ops.reference.compressed_attention`. Key row r of ck/cv is a memory key for
r < num_mem (always visible) and compressed block i = r - num_mem otherwise, visible to query t iff
its last token is not in the future: i*stride + block - 1 <= t. Both together are the key prefix

    [0, num_mem - 1 + num_visible_blocks(t, block, stride)]

(`nsa.ops.utils.num_visible_blocks`), so this is range attention with no lower bound.
"""

from nsa.ops.range_attention import NO_LO_BOUND, range_attention


def compressed_rule(block, stride, num_mem):
    """(hi_base, block, stride, lo_back) of the compressed branch's visibility for `range_attention`."""
    if block % stride:
        raise ValueError(f"stride {stride} must divide block {block}")
    return num_mem - 1, block, stride, NO_LO_BOUND


def compressed_attention(q, ck, cv, p):
    """(o [B, T, HQ, D], lse [B, T, HQ] fp32) over memory + compressed keys ck, cv [B, num_mem + N_c, H, D].

    A query that sees no key (num_mem = 0 and t < block - 1) gets o = 0 and lse = -inf. Differentiable in
    q, ck and cv through o and lse, as the reference.
    """
    if not p.causal:
        raise NotImplementedError("the Triton compressed attention is causal only: use the torch backend "
                                  "(nsa.ops.reference.compressed_attention) for causal=False")
    rule = compressed_rule(p.compress_block, p.compress_stride, p.num_mem)
    return range_attention(q, ck, cv, p.scale_for(q.shape[-1]), *rule)
