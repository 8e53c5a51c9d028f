"""NSA ops behind one interface, by backend.

Each backend is a namespace with the same five functions (signatures of `nsa.ops.reference`):
compressed_attention, topn_blocks, block_importance, selection_attention, sliding_window_attention.
`torch` is the reference itself; `flex` swaps in flex attention for the window and selection
branches; `triton` swaps in the Triton kernels.
"""

import types

from nsa.ops import reference

BACKENDS = ("torch", "flex", "triton")


def _namespace(**overrides):
    names = ("compressed_attention", "topn_blocks", "block_importance", "selection_attention",
             "sliding_window_attention")
    fns = {n: getattr(reference, n) for n in names}
    fns.update(overrides)
    return types.SimpleNamespace(**fns)


def get_ops(backend, device):
    """Resolve `backend` ('auto' picks triton on CUDA, torch elsewhere) to an ops namespace."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return _namespace()
    if backend == "flex":
        from nsa.ops import flex

        return _namespace(selection_attention=flex.selection_attention,
                          sliding_window_attention=flex.sliding_window_attention)
    if backend == "triton":
        return _triton_ops(device)
    raise ValueError(f"unknown backend {backend!r}: expected one of auto, {', '.join(BACKENDS)}")


def _triton_ops(device):
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend 'triton' needs a CUDA device (got {device.type}); use backend 'torch' or 'auto' on CPU, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter")
    from nsa.ops import triton_ops

    return triton_ops.namespace(_namespace)
