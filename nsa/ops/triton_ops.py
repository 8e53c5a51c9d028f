"""The `triton` backend: the Triton kernels where they exist, the references elsewhere.

Only `block_importance` (used by the straight-through `diff_topk` path, which the Triton selection
kernel does not support) stays on the reference; every branch of the forward runs in Triton.
"""

from nsa.ops.compressed import compressed_attention
from nsa.ops.selection import selection_attention
from nsa.ops.topn import topn_blocks
from nsa.ops.window import sliding_window_attention


def namespace(base):
    """`base(**overrides)` builds the reference namespace with the given functions swapped in."""
    return base(compressed_attention=compressed_attention, topn_blocks=topn_blocks,
                selection_attention=selection_attention, sliding_window_attention=sliding_window_attention)
