"""Triton gate mix: o = sigmoid(l_cmp) * o_cmp + sigmoid(l_slc) * o_slc + sigmoid(l_win) * o_win.

Reference twin: `nsa.ops.reference.gate_mix`. One row is a (token, query head) pair: its three gate
logits (the to_gates projection, bias included, before the sigmoid) and the three branch outputs.
Both kernels are bound by memory traffic alone: they exist because torch.compile's fused kernels for
the same mix ran far below the card's bandwidth (docs/BENCHMARKS.md, seventh round). The forward
reads the logits and the three outputs once and writes o; the backward reads dO, the logits and the
outputs once and writes the three output gradients and the logits' gradients (the row sums over the
head dim stay in fp32 registers). Gates and sums are fp32, rounded once to the output dtype.
"""

import torch
import triton
import triton.language as tl

_empty = torch.empty  # swapped for a NaN-filled allocator by the tests
BLOCK_R = 64  # rows a program; with D = 64 four 8 KB tiles of bf16 loads in flight


@triton.jit
def _rows(p_l, R, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows: their mask, the [BLOCK_R, BLOCK_D] offsets and mask of their outputs, and
    their three sigmoid gates (fp32)."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_D)
    m_r = o_r < R
    m = m_r[:, None] & (o_d < D)[None, :]
    off = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    p = p_l + o_r.to(tl.int64) * 3
    g0 = tl.sigmoid(tl.load(p, mask=m_r, other=0.0).to(tl.float32))
    g1 = tl.sigmoid(tl.load(p + 1, mask=m_r, other=0.0).to(tl.float32))
    g2 = tl.sigmoid(tl.load(p + 2, mask=m_r, other=0.0).to(tl.float32))
    return o_r, m_r, off, m, g0, g1, g2


@triton.jit
def _gate_mix_fwd_kernel(p_l, p_a, p_b, p_c, p_o, R, D: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    o_r, m_r, off, m, g0, g1, g2 = _rows(p_l, R, D, BLOCK_R, BLOCK_D)
    a = tl.load(p_a + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(p_b + off, mask=m, other=0.0).to(tl.float32)
    c = tl.load(p_c + off, mask=m, other=0.0).to(tl.float32)
    o = g0[:, None] * a + g1[:, None] * b + g2[:, None] * c
    tl.store(p_o + off, o.to(p_o.dtype.element_ty), mask=m)


@triton.jit
def _gate_mix_bwd_kernel(p_do, p_l, p_a, p_b, p_c, p_dl, p_da, p_db, p_dc, R, D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    o_r, m_r, off, m, g0, g1, g2 = _rows(p_l, R, D, BLOCK_R, BLOCK_D)
    do = tl.load(p_do + off, mask=m, other=0.0).to(tl.float32)
    ty = p_da.dtype.element_ty
    tl.store(p_da + off, (g0[:, None] * do).to(ty), mask=m)
    tl.store(p_db + off, (g1[:, None] * do).to(ty), mask=m)
    tl.store(p_dc + off, (g2[:, None] * do).to(ty), mask=m)
    # d logit = sum_d(dO * o_x) * g (1 - g): the sigmoid's derivative in the same pass.
    a = tl.load(p_a + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(p_b + off, mask=m, other=0.0).to(tl.float32)
    c = tl.load(p_c + off, mask=m, other=0.0).to(tl.float32)
    p = p_dl + o_r.to(tl.int64) * 3
    lt = p_dl.dtype.element_ty
    tl.store(p, (tl.sum(do * a, axis=1) * g0 * (1 - g0)).to(lt), mask=m_r)
    tl.store(p + 1, (tl.sum(do * b, axis=1) * g1 * (1 - g1)).to(lt), mask=m_r)
    tl.store(p + 2, (tl.sum(do * c, axis=1) * g2 * (1 - g2)).to(lt), mask=m_r)


def _grid(a):
    """Rows (token, query head) and head dim of a [B, T, HQ, D] branch output, and the launch's keywords."""
    R, D = a.numel() // max(a.shape[-1], 1), a.shape[-1]
    return R, D, dict(D=D, BLOCK_R=BLOCK_R, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4)


@torch.library.custom_op("nsa::gate_mix", mutates_args=())
def _gate_mix_op(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    logits, a, b, c = (x.contiguous() for x in (logits, a, b, c))
    o = _empty(a.shape, dtype=a.dtype, device=a.device)
    R, D, meta = _grid(a)
    if R and D:
        _gate_mix_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](logits, a, b, c, o, R, **meta)
    return o


@_gate_mix_op.register_fake
def _(logits, a, b, c):
    return a.new_empty(a.shape)


@torch.library.custom_op("nsa::gate_mix_bwd", mutates_args=())
def _gate_mix_bwd_op(do: torch.Tensor, logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    do, logits, a, b, c = (x.contiguous() for x in (do, logits, a, b, c))
    dl = _empty(logits.shape, dtype=logits.dtype, device=logits.device)
    da, db, dc = (_empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(3))
    R, D, meta = _grid(a)
    if R and D:
        _gate_mix_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](do, logits, a, b, c, dl, da, db, dc, R, **meta)
    elif R:
        dl.zero_()
    return dl, da, db, dc


@_gate_mix_bwd_op.register_fake
def _(do, logits, a, b, c):
    return logits.new_empty(logits.shape), *(a.new_empty(a.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, do):
    return _gate_mix_bwd_op(do, *ctx.saved_tensors)


_gate_mix_op.register_autograd(_backward, setup_context=_setup_context)


def gate_mix(logits, o_cmp, o_slc, o_win):
    """Triton twin of `reference.gate_mix`: logits [B, T, 3 * HQ] (per query head, its cmp, slc, win
    gate logits in that order); o_cmp, o_slc, o_win [B, T, HQ, D], one dtype. Returns [B, T, HQ, D]."""
    _check(logits, o_cmp, o_slc, o_win)
    return _gate_mix_op(logits, o_cmp, o_slc, o_win)


def _check(logits, a, b, c):
    if a.dim() != 4 or b.shape != a.shape or c.shape != a.shape:
        raise ValueError(f"branch outputs must share one [B, T, HQ, D] shape; got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(c.shape)}")
    if len({a.dtype, b.dtype, c.dtype}) != 1:
        raise TypeError(f"branch outputs must share one dtype; got {a.dtype}, {b.dtype}, {c.dtype}")
    B, T, HQ, _ = a.shape
    if tuple(logits.shape) != (B, T, 3 * HQ):
        raise ValueError(f"gate logits must be [B, T, 3 * HQ] = {[B, T, 3 * HQ]}; got {list(logits.shape)}")
    if len({logits.device, a.device, b.device, c.device}) != 1:
        raise ValueError("gate logits and branch outputs must be on one device")
