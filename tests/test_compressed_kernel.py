"""Triton compressed attention (nsa.ops.compressed, on nsa.ops.range_attention) against the reference.

On CPU the kernels run in the Triton interpreter with small tiles, so these small odd shapes still
cross several query and key tiles, the unmasked interior-tile fast path (T = 70; block 2 / stride 1
most) and the split dk/dv path with its partial-sum kernel (the NaN-poisoned partial buffers catch a
read of a split that wrote nothing). Errors are measured against the fp64 reference and held to
flash-attention's rule (`kernel_checks.assert_close`).
"""

import math

import pytest
import torch

from kernel_checks import assert_close, reference_runs

from nsa.ops import reference
from nsa.ops.common import NSAParams, num_compressed_blocks
from nsa.ops.compressed import compressed_attention

pytestmark = pytest.mark.usefixtures("poison_range_outputs")


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, T, H, G, D, block, stride, num_mem, dtype, dev):
    S = num_mem + num_compressed_blocks(T, block, stride)
    q = torch.randn(B, T, H * G, D, device=dev, dtype=dtype)
    ck = torch.randn(B, S, H, D, device=dev, dtype=dtype)
    cv = torch.randn(B, S, H, D, device=dev, dtype=dtype)
    return [x.requires_grad_() for x in (q, ck, cv)]


def check(B, T, H, G, D, block, stride, num_mem, dtype, dev=None):
    """Kernel outputs and gradients against the fp64 reference, within 2x PyTorch's error at `dtype`."""
    dev = dev or device()
    q, ck, cv = inputs(B, T, H, G, D, block, stride, num_mem, dtype, dev)
    p = NSAParams(compress_block=block, compress_stride=stride, num_mem=num_mem)
    o, lse = compressed_attention(q, ck, cv, p)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    do = torch.randn_like(o)
    got = [o, lse, *torch.autograd.grad(o, (q, ck, cv), do)]
    exact, at_dtype = reference_runs(lambda q, ck, cv: reference.compressed_attention(q, ck, cv, p), (q, ck, cv),
                                     (do, None), dtype)
    for name, g, e, t in zip(("o", "lse", "dq", "dck", "dcv"), got, exact, at_dtype):
        assert g.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_close(g, e, t, name, dtype)
    # Rows that see no key: lse = -inf (checked above, as the reference's) and o = 0.
    assert (o[lse == -math.inf] == 0).all()


# Default tier: one small odd shape per dtype (num_mem = 0: rows that see no key). The full tier
# sweeps T, memory keys, G, block / stride and head dims.
@pytest.mark.parametrize("dtype,G,num_mem", [(torch.float32, 4, 1), (torch.bfloat16, 2, 0)])
def test_small(dtype, G, num_mem):
    check(1, 37, 2, G, 32, 8, 4, num_mem, dtype)


@pytest.mark.full
@pytest.mark.parametrize("T", [1, 7, 37, 70])
@pytest.mark.parametrize("num_mem", [0, 1, 2])
def test_shapes_and_memory(T, num_mem):
    check(1, T, 2, 2, 32, 8, 4, num_mem, torch.float32)


@pytest.mark.full
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 16])
def test_group_sizes(G, dtype):
    check(2, 37, 2, G, 32, 8, 4, 1, dtype)


@pytest.mark.full
@pytest.mark.parametrize("block,stride", [(8, 4), (4, 4), (16, 8), (2, 1)])
def test_block_stride(block, stride):
    check(1, 70, 1, 2, 16, block, stride, 1, torch.float32)


@pytest.mark.full
@pytest.mark.parametrize("D", [64, 96])
def test_head_dims(D):
    check(1, 37, 1, 4, D, 8, 4, 1, torch.float32)


@pytest.mark.full
@pytest.mark.parametrize("num_mem", [0, 1])
def test_bf16(num_mem):
    check(1, 70, 2, 4, 64, 8, 4, num_mem, torch.bfloat16)


@pytest.mark.parametrize("num_mem", [0, 1])
def test_lse_gradient_flows_as_through_the_reference(num_mem):
    """lse is differentiable: its gradient adds dlse * P to dS. num_mem = 0: the first rows see no key
    (lse = -inf) and get no gradient from it. Also a loss on lse alone (o's gradient is None)."""
    q, ck, cv = inputs(1, 37, 1, 2, 16, 8, 4, num_mem, torch.float32, device())
    p = NSAParams(compress_block=8, compress_stride=4, num_mem=num_mem)
    do = torch.randn_like(q)
    # Rows that see no key have lse = -inf and take no part in the loss.
    dl = torch.randn(q.shape[:3], device=q.device) * (reference.compressed_attention(q, ck, cv, p)[1] > -math.inf)

    def grads(fn, use_o):
        o, lse = fn(q, ck, cv, p)
        loss = (torch.where(lse > -math.inf, lse, 0) * dl).sum() + ((o * do).sum() if use_o else 0)
        return torch.autograd.grad(loss, (q, ck, cv))

    for use_o in (True, False):
        lse_grad = (do if use_o else None, dl)
        exact, at_dtype = reference_runs(lambda q, ck, cv: reference.compressed_attention(q, ck, cv, p), (q, ck, cv),
                                         lse_grad, torch.float32)
        for name, g, e, t in zip(("dq", "dck", "dcv"), grads(compressed_attention, use_o), exact[2:], at_dtype[2:]):
            assert_close(g, e, t, name)


@pytest.mark.full
def test_compiles_without_graph_break():
    q, ck, cv = inputs(1, 37, 1, 2, 16, 8, 4, 1, torch.float32, device())
    p = NSAParams(compress_block=8, compress_stride=4, num_mem=1)

    def f(q, ck, cv):
        o, lse = compressed_attention(q, ck, cv, p)
        return o.sum() + lse.sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(q, ck, cv).backward()
    exact, at_dtype = reference_runs(lambda q, ck, cv: reference.compressed_attention(q, ck, cv, p), (q, ck, cv),
                                     (torch.ones(q.shape), torch.ones(q.shape[:3])), torch.float32)
    assert_close(q.grad, exact[2], at_dtype[2], "dq")


def test_not_causal_raises():
    q, ck, cv = inputs(1, 8, 1, 1, 16, 4, 4, 1, torch.float32, device())
    with pytest.raises(NotImplementedError):
        compressed_attention(q, ck, cv, NSAParams(compress_block=4, compress_stride=4, causal=False))


@pytest.mark.gpu
@pytest.mark.parametrize("G,D", [(16, 128), (1, 64), (3, 96), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large(G, D, dtype):
    check(2, 2048, 2, G, D, 32, 16, 1, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_long_split_dkdv():
    check(1, 8192, 4, 16, 128, 32, 16, 1, torch.bfloat16, "cuda")


RANGE_CALL = """
from nsa.ops.compressed import compressed_attention
from nsa.ops.common import NSAParams
from nsa.ops.window import sliding_window_attention
for dtype, HQ, H, D in [(torch.bfloat16, 64, 4, 128), (torch.float32, 2, 2, 64)]:
    T = 1000
    x = lambda *shape: torch.zeros(*shape, dtype=dtype, requires_grad=True)
    q, k, v, ck, cv = x(1, T, HQ, D), x(1, T, H, D), x(1, T, H, D), x(1, 62, H, D), x(1, 62, H, D)
    compressed_attention(q, ck, cv, NSAParams())[0].sum().backward()
    sliding_window_attention(q, k, v, NSAParams()).sum().backward()
"""
RANGE_KERNELS = ["_range_fwd_kernel", "_range_dq_kernel", "_range_dkdv_kernel", "_range_sum_splits_kernel"]


@pytest.mark.full
@pytest.mark.parametrize("arch", [90, 80, 86])
def test_range_attention_kernels_compile_ahead_of_time_within_shared_memory(arch):
    # The compressed and window branches' forward and backward launches (GPU tile sizes), bf16 paper
    # setting and fp32 with G = 1, D = 64, for an H100, an A100 (163 KiB) and a consumer card (99 KiB):
    # the launches fall back to what fits (on sm_86 the bf16 D = 128 dq kernel takes 2 stages, not 3).
    from kernel_checks import compile_launches

    assert compile_launches("nsa.ops.range_attention", RANGE_KERNELS, RANGE_CALL, arch) >= 12


def test_fitting_takes_the_first_launch_that_fits(monkeypatch):
    """utils.fitting against a stand-in kernel whose compiled shared memory is 1000 x BLOCK bytes."""
    from types import SimpleNamespace

    from nsa.ops import utils

    class Kernel:
        def __init__(self):
            self.compiled = []

        def warmup(self, *args, grid, **kw):
            self.compiled.append(kw["BLOCK"])
            return SimpleNamespace(metadata=SimpleNamespace(shared=1000 * kw["BLOCK"]))

    monkeypatch.setattr(utils, "interpreting", lambda: False)
    monkeypatch.setattr(utils, "max_shared_mem", lambda index: 100_000)
    launches = [dict(BLOCK=128), dict(BLOCK=64), dict(BLOCK=32)]
    kernel = Kernel()
    assert utils.fitting(kernel, (), launches, 0, "key") == dict(BLOCK=64)
    assert utils.fitting(kernel, (), launches, 0, "key") == dict(BLOCK=64)
    assert kernel.compiled == [128, 64]  # the second call is the cached choice
    monkeypatch.setattr(utils, "max_shared_mem", lambda index: 10_000)
    assert utils.fitting(Kernel(), (), launches, 0, "key") == dict(BLOCK=32)  # nothing fits: the smallest
    monkeypatch.setattr(utils, "max_shared_mem", lambda index: 10**6)
    kernel = Kernel()
    assert utils.fitting(kernel, (), launches, 0, "key") == dict(BLOCK=128) and kernel.compiled == [128]
