"""Triton sliding-window attention (nsa.ops.window, on nsa.ops.range_attention) against the reference.

On CPU the kernels run in the Triton interpreter with small tiles (16 keys), so windows below, at and
above a tile and sequences of several tiles exercise the band skipping and the unmasked fast path for
tiles inside the band (T = 70, window 33). Errors are measured against the fp64 reference and held to
flash-attention's rule (`kernel_checks.assert_close`).
"""

import pytest
import torch

from kernel_checks import assert_close, reference_runs

from nsa.ops import reference
from nsa.ops.common import NSAParams
from nsa.ops.window import sliding_window_attention

pytestmark = pytest.mark.usefixtures("poison_range_outputs")


def check(B, T, H, G, D, window, dtype, dev=None):
    """Kernel output and gradients against the fp64 reference, within 2x PyTorch's error at `dtype`."""
    dev = dev or ("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.randn(B, T, H * G, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
    p = NSAParams(window=window)
    o = sliding_window_attention(q, k, v, p)
    assert o.dtype == q.dtype
    do = torch.randn_like(o)
    got = [o, *torch.autograd.grad(o, (q, k, v), do)]
    exact, at_dtype = reference_runs(lambda q, k, v: reference.sliding_window_attention(q, k, v, p), (q, k, v),
                                     (do,), dtype)
    for name, g, e, t in zip(("o", "dq", "dk", "dv"), got, exact, at_dtype):
        assert_close(g, e, t, name)


# Default tier: one small odd shape per dtype. The full tier sweeps T, windows, G and head dims.
@pytest.mark.parametrize("dtype,G", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_small(dtype, G):
    check(1, 37, 2, G, 32, 9, dtype)


@pytest.mark.full
@pytest.mark.parametrize("T", [1, 7, 37, 70])
@pytest.mark.parametrize("window", [1, 5, 16, 33])
def test_shapes_and_windows(T, window):
    check(1, T, 2, 2, 32, window, torch.float32)


@pytest.mark.full
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 16])
def test_group_sizes(G, dtype):
    check(2, 37, 2, G, 32, 9, dtype)


@pytest.mark.full
@pytest.mark.parametrize("D", [64, 96])
def test_head_dims(D):
    check(1, 37, 1, 2, D, 20, torch.float32)


@pytest.mark.full
@pytest.mark.parametrize("G", [1, 4])
def test_bf16(G):
    check(1, 70, 2, G, 64, 24, torch.bfloat16)


@pytest.mark.full
def test_compiles_without_graph_break():
    q, k, v = (torch.randn(1, 20, 2, 16, requires_grad=True) for _ in range(3))
    f = torch.compile(lambda q, k, v: sliding_window_attention(q, k, v, NSAParams(window=6)), backend="aot_eager",
                      fullgraph=True)
    f(q, k, v).sum().backward()
    exact, at_dtype = reference_runs(lambda q, k, v: reference.sliding_window_attention(q, k, v, NSAParams(window=6)),
                                     (q, k, v), (torch.ones(q.shape),), torch.float32)
    assert_close(q.grad, exact[1], at_dtype[1], "dq")


def test_not_causal_raises():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(NotImplementedError):
        sliding_window_attention(q, q, q, NSAParams(window=4, causal=False))


@pytest.mark.gpu
@pytest.mark.parametrize("G,D", [(16, 128), (1, 64), (3, 96), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large(G, D, dtype):
    check(2, 2048, 2, G, D, 512, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_window_longer_than_sequence():
    check(1, 1000, 4, 16, 128, 4096, torch.bfloat16, "cuda")
