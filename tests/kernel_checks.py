"""Helpers shared by the kernel tests: tolerances calibrated to the dtype, and compiling launches for sm_90
without a GPU."""

import contextlib

import torch

from nsa.ops import reference
from nsa.ops.utils import interpreting


def _round(x, dtype):
    """x rounded to `dtype` as the kernels round it, returned in x's dtype. Triton's interpreter
    truncates fp32 -> bf16 (the GPU rounds to nearest), so under it the bf16 rounding truncates too."""
    if dtype == torch.bfloat16 and interpreting():
        return (x.float().view(torch.int32) & -65536).view(torch.float32).to(x.dtype)
    return x.to(dtype).to(x.dtype)


class _FlashAttention(torch.autograd.Function):
    """Masked GQA attention computed the way the kernels compute it, in PyTorch: every product of
    `dtype` operands accumulated in fp32 (fp64 for fp64), P and dS rounded to `dtype` before their
    products, each output rounded once to `dtype`; the backward recomputes P = exp(s - lse) and takes
    the row correction delta = rowsum(o * dO) - dlse."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        B, T, HQ, D = q.shape
        H = k.shape[2]
        qg, k, v = q.to(acc).view(B, T, H, HQ // H, D), k.to(acc), v.to(acc)
        s = torch.einsum("bthgd,bshd->bhgts", qg, k) * scale
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        denom = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        lse = (m + torch.log(denom)).squeeze(-1)
        o = _round(torch.einsum("bhgts,bshd->bthgd", _round(p, dtype), v), dtype)
        ctx.save_for_backward(qg, k, v, mask, lse, o)
        ctx.scale, ctx.dtype = scale, dtype
        return o.reshape(B, T, HQ, D).to(dtype), lse.permute(0, 3, 1, 2).reshape(B, T, HQ)

    @staticmethod
    def backward(ctx, do, dlse):
        qg, k, v, mask, lse, o = ctx.saved_tensors
        dtype, acc = ctx.dtype, lse.dtype
        B, T, H, G, D = qg.shape
        dog = do.to(acc).view(B, T, H, G, D)
        s = torch.einsum("bthgd,bshd->bhgts", qg, k) * ctx.scale
        # A row that saw no key has lse = -inf: its P is 0, as the kernels make it.
        lse = torch.where(lse == float("-inf"), float("inf"), lse)[..., None]
        p = torch.where(mask, torch.exp(s - lse), 0)
        dv = torch.einsum("bhgts,bthgd->bshd", _round(p, dtype), dog)
        dp = torch.einsum("bthgd,bshd->bhgts", dog, v)
        delta = (o * dog).sum(-1).permute(0, 2, 3, 1)[..., None]
        if dlse is not None:
            delta = delta - dlse.to(acc).view(B, T, H, G).permute(0, 2, 3, 1)[..., None]
        ds = _round(p * (dp - delta), dtype)
        dq = torch.einsum("bhgts,bshd->bthgd", ds, k) * ctx.scale
        dk = torch.einsum("bhgts,bthgd->bshd", ds, qg) * ctx.scale
        return (_round(dq, dtype).reshape(B, T, H * G, D).to(dtype), _round(dk, dtype).to(dtype),
                _round(dv, dtype).to(dtype), None, None, None)


def _attend_at(dtype):
    """A stand-in for `reference.attend` (same arguments, masking and empty-key rule) computed by
    `_FlashAttention` at `dtype`."""
    def attend(q, k, v, mask, scale, gate=None):
        assert gate is None, "the kernel checks compare ungated attention"
        B, T, HQ, D = q.shape
        if k.shape[1] == 0:
            return q * 0, q.new_full((B, T, HQ), float("-inf"), dtype=torch.float32)
        mask = mask.expand(B, k.shape[2], HQ // k.shape[2], T, k.shape[1])
        return _FlashAttention.apply(q, k, v, mask, scale, dtype)

    return attend


@contextlib.contextmanager
def _reference_at(dtype):
    saved = reference.attend
    reference.attend = _attend_at(dtype)
    try:
        yield
    finally:
        reference.attend = saved


def reference_runs(fn, inputs, grad_outputs, dtype):
    """(exact, at_dtype): the outputs of the reference function `fn(*inputs)` (a tensor or a tuple)
    followed by the gradients of `inputs` for `grad_outputs` (one per output, None for an output no
    loss uses), once in fp64 (the exact answer, against which errors are measured) and once the way
    PyTorch computes them at `dtype` (whose error is the yardstick). An input no output depends on
    gets a zero gradient."""
    runs = []
    for prec in (torch.float64, dtype):
        xs = [x.detach().to(prec).requires_grad_() for x in inputs]
        with _reference_at(prec):
            outs = fn(*xs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            used = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outputs) if g is not None]
            grads = torch.autograd.grad([o for o, _ in used], xs, [g for _, g in used], allow_unused=True)
        runs.append([o.detach() for o in outs] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)])
    return runs


# How many times PyTorch's own error at the dtype a kernel's may be. 16-bit: flash-attention's 2, the
# errors being the dtype's roundings, which both make. fp32: the errors are a few ulps of summation-
# order noise, and two fp32 orders differ by up to 6x at the worst element (measured over these tests).
FACTOR = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 8}


def assert_close(got, exact, at_dtype, what, dtype=None):
    """Flash-attention's rule: the kernel's error is at most FACTOR (2 for 16-bit) times that of the
    same computation in PyTorch at the kernel's dtype (`reference_runs`), plus two rounding steps of the
    output: max |got - exact| <= FACTOR max |at_dtype - exact| + 2 max |(x + 0.3) - 0.3 - x|, errors
    measured against the fp64 answer. `dtype`: the computation's dtype where the output's differs (an
    fp32 lse from bf16 inputs). Infinities (lse of a row that sees no key) must match; any NaN (an
    element the kernel never wrote, with NaN-poisoned outputs) fails."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert not got.isnan().any(), f"{what}: NaN (unwritten or invalid) elements"
    assert torch.equal(got.isinf(), exact.isinf()), f"{what}: infinities differ from the reference's"
    fin = exact.isfinite()
    if not fin.any():
        return
    g, e, t = got[fin].double(), exact[fin].double(), at_dtype[fin].double()
    err, torch_err = (g - e).abs().max().item(), (t - e).abs().max().item()
    # One rounding step of the output at its magnitude (+ 0.3, as flash-attention's tests), in its dtype.
    x = e.to(got.dtype)
    step = ((x + 0.3) - 0.3 - x).abs().max().item()
    factor = FACTOR[dtype or got.dtype]
    bound = factor * torch_err + 2 * step
    assert err <= bound, (f"{what}: max error {err:.3g} > {bound:.3g} ({factor}x PyTorch's {torch_err:.3g} at "
                          f"{dtype or got.dtype})")


def compile_launches(module, kernels, call, arch=90):
    """`scripts/kernel_resources.compile_launches`: every launch `call` makes, compiled for sm_`arch` with
    no GPU and checked against its shared memory; the number compiled."""
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import kernel_resources

    return kernel_resources.compile_launches(module, kernels, call, arch)
