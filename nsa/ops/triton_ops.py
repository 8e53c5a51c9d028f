"""The `triton` backend: one module holding the seven ops `SparseAttention` calls.

Every branch of the forward, the gate mix and the decode step run in Triton; only `block_importance`
(used by the straight-through `diff_topk` path, which the Triton selection kernel does not support) is
the reference's.
"""

from nsa.ops.compressed import compressed_attention  # noqa: F401
from nsa.ops.decode import decode_attention  # noqa: F401
from nsa.ops.gates import gate_mix  # noqa: F401
from nsa.ops.reference import block_importance  # noqa: F401
from nsa.ops.selection import selection_attention  # noqa: F401
from nsa.ops.topn import topn_blocks  # noqa: F401
from nsa.ops.window import sliding_window_attention  # noqa: F401
