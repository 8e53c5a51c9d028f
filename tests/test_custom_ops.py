"""`torch.library.opcheck` over every custom op of the Triton kernels: the schema, the fake (meta)
kernel against the real one (shapes, dtypes and strides: what torch.compile plans with), the
autograd registration, and AOT dispatch with dynamic shapes (outputs and gradients as in eager).

Small shapes in the interpreter, contiguous and non-contiguous inputs: the ops make their inputs
contiguous, so their outputs are contiguous either way, and the fake kernels must say so.
"""

import pytest
import torch

from nsa.ops import decode, range_attention, reference, selection, topn
from nsa.ops.common import NSAParams, ceil_div, num_compressed_blocks
from nsa.ops.compressed import compressed_rule
from nsa.ops.window import window_rule

LAYOUTS = ["contiguous", "strided"]
P = NSAParams(compress_block=8, compress_stride=4, sel_block=8, num_mem=1, num_selected=3, window=6)
# AOT dispatch runs every op several more times; the default tier checks schema, fake kernel and
# autograd registration, the full tier everything.
QUICK = ("test_schema", "test_autograd_registration", "test_faketensor")


def _layout(x, layout):
    """x, or the same values stored heads-before-tokens and viewed back: dense but not contiguous."""
    return x if layout == "contiguous" else x.transpose(1, 2).contiguous().transpose(1, 2)


def _randn(*shape, layout, grad=False):
    x = _layout(torch.randn(*shape), layout)
    return x.requires_grad_() if grad else x


def _check(op, args, full):
    torch.library.opcheck(op, args, test_utils="ALL" if full else QUICK)


TIERS = [pytest.param(False, id="quick"), pytest.param(True, id="aot", marks=pytest.mark.full)]


@pytest.mark.parametrize("full", TIERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", ["compressed", "window"])
def test_range_attention(rule, layout, full):
    T, H, G, D = 21, 1, 2, 16
    S = P.num_mem + num_compressed_blocks(T, P.compress_block, P.compress_stride) if rule == "compressed" else T
    rule = compressed_rule(P.compress_block, P.compress_stride, P.num_mem) if rule == "compressed" \
        else window_rule(P.window)
    q = _randn(1, T, H * G, D, layout=layout, grad=True)
    k, v = (_randn(1, S, H, D, layout=layout, grad=True) for _ in range(2))
    _check(range_attention._range_attention_op, (q, k, v, 0.25, *rule), full)
    o, lse = range_attention._range_attention_op(q, k, v, 0.25, *rule)
    do = _layout(torch.randn_like(o), layout)
    for dlse in (None, _layout(torch.randn_like(lse), layout)):
        _check(range_attention._range_attention_bwd_op, (do, q.detach(), k.detach(), v.detach(), o.detach(),
                                                         lse.detach(), dlse, 0.25, *rule), full)


def _indices(T, Hs, n):
    imp = torch.rand(1, T, Hs, ceil_div(T, P.sel_block))
    return reference.select_blocks(imp, NSAParams(sel_block=P.sel_block, num_selected=n))


@pytest.mark.parametrize("full", TIERS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_selection(layout, full):
    T, H, G, D = 19, 1, 2, 16
    q = _randn(1, T, H * G, D, layout=layout, grad=True)
    k, v = (_randn(1, T, H, D, layout=layout, grad=True) for _ in range(2))
    idx = _layout(_indices(T, H, 2), layout)
    _check(selection._fwd_op, (q, k, v, idx, P.sel_block, 0.25), full)
    o, lse, *walk = selection._fwd_op(q, k, v, idx, P.sel_block, 0.25)
    do = _layout(torch.randn_like(o), layout)
    _check(selection._bwd_op, (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, idx, *walk, P.sel_block,
                               0.25), full)


@pytest.mark.parametrize("full", TIERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shared", [True, False])
def test_topn(shared, layout, full):
    T, H, G, D = 37, 1, 2, 16
    q = _randn(1, T, H * G, D, layout=layout)
    ck = _randn(1, P.num_mem + num_compressed_blocks(T, P.compress_block, P.compress_stride), H, D, layout=layout)
    lse = _layout(reference.compressed_attention(q, ck, ck, P)[1], layout)
    _check(topn._topn_op, (q, ck, lse, P.compress_block, P.compress_stride, P.sel_block, P.num_mem,
                           P.num_selected, P.num_initial, P.num_local, shared, 0.25), full)


@pytest.mark.parametrize("full", TIERS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode(monkeypatch, layout, full):
    # The arguments as `decode_attention` passes them to its op, recorded on the way through.
    B, H, G, D, S = 1, 1, 2, 16, 30
    nc = num_compressed_blocks(S, P.compress_block, P.compress_stride)
    q, q_rot = (_layout(torch.randn(B, H * G, D), layout) for _ in range(2))
    ck, cv = (torch.randn(B, P.num_mem + nc, H, D) for _ in range(2))
    k_slc, v_slc = (torch.randn(B, S, H, D) for _ in range(2))
    if layout == "strided":  # caches as the model keeps them: the filled part of a longer buffer
        k_slc, v_slc = (torch.randn(B, S + 5, H, D)[:, :S] for _ in range(2))
    x, w_gate, b_gate = torch.randn(B, 24), torch.randn(3 * H * G, 24), torch.randn(3 * H * G)
    recorded = []
    real = decode._decode_op
    monkeypatch.setattr(decode, "_decode_op", lambda *a: recorded.append(a) or real(*a))
    decode.decode_attention(q, q_rot, ck, cv, k_slc, v_slc, k_slc, v_slc, x, w_gate, b_gate, torch.tensor(S - 1), P)
    _check(real, recorded[0], full)
