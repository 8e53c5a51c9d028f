"""The chunked `torch` backend (nsa/ops/chunked.py) against the dense references: the same outputs and
gradients with many chunks, and activation memory that grows like T, not T^2."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nsa.attention
from nsa.attention import SparseAttention
from nsa.config import NSAConfig
from nsa.ops import chunked as K
from nsa.ops import get_ops
from nsa.ops import reference as R
from nsa.ops.common import NSAParams, num_compressed_blocks


def force_rows(monkeypatch, rows):
    """Every op runs `rows` rows a chunk, whatever the element budget says."""
    monkeypatch.setattr(K, "_rows", lambda per_row: rows)


def close(actual, expected):
    """fp32 agreement relative to the tensor's scale (both sides round in fp32, in different orders)."""
    scale = max(1.0, expected.abs().amax().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def grads(out, inputs):
    """Gradients of a random projection of the outputs (the same projection for both backends)."""
    g = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in out)
    return torch.autograd.grad(loss, inputs)


def leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


FULL = pytest.mark.full
OP_CASES = [  # T, G, H, shared, causal, num_mem
    (77, 1, 2, True, True, 1), (77, 4, 1, False, True, 0), (130, 2, 2, True, False, 0),
    (130, 16, 1, False, False, 1), (300, 4, 2, True, True, 0), pytest.param(300, 2, 1, False, True, 1, marks=FULL),
    pytest.param(130, 1, 3, False, True, 1, marks=FULL), pytest.param(77, 16, 1, True, False, 1, marks=FULL),
]


@pytest.mark.parametrize("T,G,H,shared,causal,num_mem", OP_CASES)
def test_ops_equal_reference_outputs_and_gradients(monkeypatch, T, G, H, shared, causal, num_mem):
    force_rows(monkeypatch, math.ceil(T / 5))  # 5 chunks of an odd size, across block and window edges
    assert len(K._spans(T, 1)) == 5
    B, D = 2, 8
    p = NSAParams(compress_block=8, compress_stride=4, sel_block=16, num_mem=num_mem, num_selected=5, window=20,
                  shared_selection=shared, causal=causal, scale=0.3)
    n_c = num_mem + num_compressed_blocks(T, 8, 4)
    q, k, v, ck, cv = leaf(B, T, G * H, D), leaf(B, T, H, D), leaf(B, T, H, D), leaf(B, n_c, H, D), leaf(B, n_c, H, D)
    idx = R.topn_blocks(q, ck, R.compressed_attention(q, ck, cv, p)[1], p)
    gate = torch.rand(idx.shape, requires_grad=True)
    results = []
    for ops in (R, K):
        o_cmp, lse = ops.compressed_attention(q, ck, cv, p)
        top = ops.topn_blocks(q, ck, lse, p)
        lse_fin = lse.nan_to_num(neginf=0.0)  # the reference's importance backward is NaN at lse = -inf
        imp = ops.block_importance(q, ck, lse_fin.detach(), p)
        o_slc = ops.selection_attention(q, k, v, idx, p)
        o_gated = ops.selection_attention(q, k, v, idx, p, block_gate=gate)
        o_win = ops.sliding_window_attention(q, k, v, p)
        out = (o_cmp, lse_fin, imp, o_slc, o_gated, o_win)
        results.append((top, *out, *grads(out, (q, k, v, ck, cv, gate))))
    ref, got = results
    assert torch.equal(got[0], ref[0])
    assert torch.equal(ref[0], idx)
    for a, b in zip(got[1:], ref[1:]):
        close(a, b)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,window", [(77, 20), (130, 1), (130, 2), (77, 64), (300, 37), (40, 100)])
@pytest.mark.parametrize("G,H", [(1, 2), (4, 1), pytest.param(2, 2, marks=FULL), pytest.param(16, 1, marks=FULL)])
def test_window_equals_reference(monkeypatch, causal, T, window, G, H):
    # local-attention's exact window: keys (t - w, t], or |t - s| < w, for any T, w (w = 1 and w > T
    # included), GQA through repeated keys; one (batch, kv head) row a chunk.
    force_rows(monkeypatch, 1)
    p = NSAParams(window=window, causal=causal, scale=0.7)
    q, k, v = leaf(2, T, G * H, 8), leaf(2, T, H, 8), leaf(2, T, H, 8)
    ref = R.sliding_window_attention(q, k, v, p)
    got = K.sliding_window_attention(q, k, v, p)
    close(got, ref)
    for a, b in zip(grads([got], (q, k, v)), grads([ref], (q, k, v))):
        close(a, b)


def test_window_keeps_input_dtype():
    q, k, v = (torch.randn(1, 20, 2, 8, dtype=torch.bfloat16) for _ in range(3))
    p = NSAParams(window=5)
    got = K.sliding_window_attention(q, k, v, p)
    assert got.dtype == torch.bfloat16
    # Both compute in fp32 and round once to bf16, so they differ by at most one bf16 step.
    torch.testing.assert_close(got, R.sliding_window_attention(q, k, v, p), rtol=1e-2, atol=1e-2)


def test_importance_without_memory_has_finite_gradients():
    # num_mem = 0: queries before the first complete block see no key (lse = -inf); their importance is
    # 0 and must pass a zero gradient, not exp(inf) * 0 = NaN.
    p = NSAParams(compress_block=8, compress_stride=4, sel_block=16, num_mem=0, num_selected=4)
    q = leaf(1, 40, 2, 8)
    ck, cv = leaf(1, num_compressed_blocks(40, 8, 4), 1, 8), torch.randn(1, num_compressed_blocks(40, 8, 4), 1, 8)
    o, lse = K.compressed_attention(q, ck, cv, p)
    assert torch.isinf(lse[0, :7]).all()
    g = torch.autograd.grad(K.block_importance(q, ck, lse.detach(), p).sum() + o.sum(), (q, ck))
    assert all(torch.isfinite(x).all() for x in g)


def layer(**nsa):
    cfg = dict(compress_block=8, compress_stride=4, sel_block=16, num_selected=5, window=24, backend="torch")
    cfg.update(nsa)
    return SparseAttention(32, 8, 2, 8, NSAConfig(**cfg))


@pytest.mark.parametrize("diff_topk,num_mem,shared,causal", [
    (False, 1, True, True), (False, 0, False, True), (True, 1, True, True), (True, 1, False, False),
    (False, 1, False, False), (True, 0, True, True),
])
def test_layer_equals_reference_layer(monkeypatch, diff_topk, num_mem, shared, causal):
    """SparseAttention on backend torch against the same layer on the references: output, input and
    parameter gradients."""
    force_rows(monkeypatch, 23)
    torch.manual_seed(0)
    attn = layer(diff_topk=diff_topk, num_mem=num_mem, shared_selection=shared, causal=causal)
    x = leaf(2, 130, 32)
    results = []
    for ops in (K, R):
        monkeypatch.setattr(nsa.attention, "get_ops", lambda backend, device, ops=ops: ops)
        y = attn(x)
        results.append((y, *grads([y], (x, *(w for w in attn.parameters() if w.requires_grad)))))
    got, ref = results
    close(got[0], ref[0])
    if diff_topk and num_mem == 0:  # the reference's importance gradient is NaN there (see above)
        assert all(torch.isfinite(g).all() for g in got[1:])
        return
    for a, b in zip(got[1:], ref[1:]):
        close(a, b)


def test_torch_backend_is_the_chunked_module():
    assert get_ops("torch", torch.device("cpu")) is K
    assert get_ops("auto", torch.device("cpu")) is K


class LargestTensor(TorchDispatchMode):
    """The largest storage (in elements) any op creates while active, views counted by their base."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def largest_intermediate(monkeypatch, ops, T, diff_topk=False):
    monkeypatch.setattr(nsa.attention, "get_ops", lambda backend, device: ops)
    torch.manual_seed(0)
    attn = layer(diff_topk=diff_topk, window=32, num_selected=4)
    x = torch.randn(1, T, 32, requires_grad=True)
    with LargestTensor() as mode:
        attn(x).square().sum().backward()
    return mode.largest


def test_memory_grows_linearly_in_T(monkeypatch):
    # One forward + backward of a layer (8 query heads, w = 32, n l' = 64, d = 4), with a chunk budget
    # small against T. The largest intermediate stays within B * HQ * T * (w + n l' + T / d) and doubles
    # with T; the references' [T, T] scores are larger, so the counter does see them.
    monkeypatch.setattr(K, "CHUNK_ELEMENTS", 1 << 15)
    B, HQ, w, nl, d = 1, 8, 32, 4 * 16, 4
    largest = {T: largest_intermediate(monkeypatch, K, T) for T in (256, 512)}
    for T in (256, 512):
        assert largest[T] <= B * HQ * T * (w + nl + T // d)
    assert largest_intermediate(monkeypatch, K, 512, diff_topk=True) <= B * HQ * 512 * (w + nl + 512 // d)
    assert largest[512] <= 2.2 * largest[256]
    assert largest_intermediate(monkeypatch, R, 512) >= B * HQ * 512 * 512


@FULL
def test_layer_traces_into_one_graph(monkeypatch):
    # torch.compile-traceable: the chunk loops, checkpoints and local-attention trace without a break.
    force_rows(monkeypatch, 16)
    for diff_topk in (False, True):
        attn = SparseAttention(32, 4, 2, 8, NSAConfig(compress_block=8, compress_stride=4, sel_block=8, num_selected=4,
                                                      window=12, diff_topk=diff_topk, backend="torch"))
        explained = torch._dynamo.explain(attn)(torch.randn(2, 40, 32, requires_grad=True))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        torch._dynamo.reset()
