"""Triton gate mix (nsa.ops.gates) against `reference.gate_mix`: outputs and gradients (of the logits
and of all three branch outputs) in NaN-filled buffers, odd row counts, head dims that are not a power
of two, fp32 and bf16, held to flash-attention's rule (`kernel_checks.assert_close`); opcheck of both ops."""

import sys
from pathlib import Path

import pytest
import torch

from kernel_checks import assert_close, reference_runs

from nsa.ops import gates, reference


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(gates, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))


def _inputs(B, T, HQ, D, dtype, dev="cpu"):
    logits = (2 * torch.randn(B, T, 3 * HQ, device=dev)).to(dtype).requires_grad_()
    outs = [torch.randn(B, T, HQ, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
    return [logits, *outs]


def check(B, T, HQ, D, dtype, dev="cpu"):
    xs = _inputs(B, T, HQ, D, dtype, dev)
    o = gates.gate_mix(*xs)
    assert o.dtype == dtype and o.shape == (B, T, HQ, D)
    do = torch.randn_like(o)
    got = [o, *torch.autograd.grad(o, xs, do)]
    exact, at_dtype = reference_runs(reference.gate_mix, xs, (do,), dtype)
    for name, g, e, t in zip(("o", "dlogits", "do_cmp", "do_slc", "do_win"), got, exact, at_dtype):
        assert_close(g, e, t, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,HQ,D", [(1, 37, 3, 16), (2, 29, 8, 48), (1, 70, 1, 64)])
def test_matches_reference(B, T, HQ, D, dtype):
    check(B, T, HQ, D, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_model_shape(dtype):
    check(2, 4099, 8, 64, dtype, "cuda")


def test_backends_share_the_reference():
    from nsa.ops import chunked, flex, triton_ops

    assert chunked.gate_mix is reference.gate_mix and flex.gate_mix is reference.gate_mix
    assert triton_ops.gate_mix is gates.gate_mix


def test_bad_shapes_are_refused():
    logits, a, b, c = _inputs(1, 5, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"\[B, T, 3 \* HQ\]"):
        gates.gate_mix(logits[..., :-1], a, b, c)
    with pytest.raises(ValueError, match="one \\[B, T, HQ, D\\] shape"):
        gates.gate_mix(logits, a, b[:, :-1], c)
    with pytest.raises(TypeError, match="one dtype"):
        gates.gate_mix(logits, a, b.double(), c)


@pytest.mark.parametrize("full", [pytest.param(False, id="quick"),
                                  pytest.param(True, id="aot", marks=pytest.mark.full)])
def test_opcheck(full):
    tests = "ALL" if full else ("test_schema", "test_autograd_registration", "test_faketensor")
    logits, a, b, c = _inputs(1, 9, 2, 16, torch.float32)
    strided = a.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for args in ((logits, a, b, c), (logits, strided, b, c)):
        torch.library.opcheck(gates._gate_mix_op, args, test_utils=tests)
    do = torch.randn_like(a)
    torch.library.opcheck(gates._gate_mix_bwd_op, (do, logits.detach(), a.detach(), b.detach(), c.detach()),
                          test_utils=tests)


@pytest.mark.full
def test_kernels_compile_ahead_of_time_for_sm90():
    # The interpreter never runs Triton's compiler: compile both launches at the model's shape for an
    # H100 / H200 (scripts/kernel_resources.py's call for this module).
    from kernel_checks import compile_launches

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from kernel_resources import MODEL_CALLS

    kernels, body = MODEL_CALLS["nsa.ops.gates"]
    assert compile_launches("nsa.ops.gates", kernels, "T, HQ, H, D = 1000, 8, 1, 64\n" + body) == 2
