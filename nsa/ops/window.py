"""Sliding-window attention on the range-attention kernel (`nsa.ops.range_attention`).

Reference twin: `nsa.ops.reference.sliding_window_attention`. Query t sees keys (t - window, t], the
interval [t - window + 1, t]; the kernel visits only key tiles that meet a query tile's band, so the
cost is O(T * window), not O(T^2).
"""

from nsa.ops.range_attention import range_attention


def window_rule(window):
    """(hi_base, block, stride, lo_back) of the causal window for `range_attention`: one-token blocks at
    stride 1, so hi(t) = -1 + (t + 1) = t."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return -1, 1, 1, window - 1


def sliding_window_attention(q, k, v, p):
    """o [B, T, HQ, D]: attention over the `p.window` most recent keys, the query's own token included."""
    if not p.causal:
        raise NotImplementedError("the Triton sliding window is causal only: use the torch or flex backend "
                                  "for causal=False")
    return range_attention(q, k, v, p.scale_for(q.shape[-1]), *window_rule(p.window))[0]
