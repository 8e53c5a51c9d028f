"""NSA ops behind one interface, by backend.

A backend is a module with the seven functions `SparseAttention` calls, each with the signature of
its twin in `nsa.ops.reference`: compressed_attention, topn_blocks, block_importance,
selection_attention, sliding_window_attention, gate_mix (the gated sum of the three branches) and
(one token at a time) decode_attention. `torch`
(nsa/ops/chunked.py) computes the references' results a chunk of queries at a time, in memory linear
in T; `flex` (nsa/ops/flex.py) swaps in flex attention for the window and selection branches;
`triton` (nsa/ops/triton_ops.py) the Triton kernels. The references themselves are no backend: they
build dense [T, T] masks and are the spec every backend is tested against, not something to train
with. Modules, not objects built per call, so torch.compile traces through the lookup without a
graph break.
"""

import os

from nsa.ops import chunked, flex

try:  # imported here, not on first use, so that torch.compile sees no import inside the forward
    from nsa.ops import triton_ops
except ImportError as e:  # triton is Linux-only
    triton_ops, _triton_error = None, e

BACKENDS = ("torch", "flex", "triton")


class BackendError(RuntimeError):
    """A backend that cannot run here (triton without CUDA or without the triton package)."""


def get_ops(backend, device):
    """Resolve `backend` ('auto' picks triton on CUDA, torch elsewhere) to its ops module."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return chunked
    if backend == "flex":
        return flex
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(
                f"backend 'triton' needs a CUDA device (got {device.type}); use backend 'torch' or 'auto' on CPU, "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter")
        if triton_ops is None:
            raise BackendError(f"backend 'triton' needs the triton package, which failed to import: {_triton_error}")
        return triton_ops
    raise ValueError(f"unknown backend {backend!r}: expected one of auto, {', '.join(BACKENDS)}")
