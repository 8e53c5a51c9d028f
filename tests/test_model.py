"""Model-level properties of SparseAttention and the Transformer, on the CPU backends."""

import copy
import warnings

import pytest
import torch

from nsa.attention import DenseAttention, SparseAttention
from nsa.config import ModelConfig, NSAConfig
from nsa.model import Transformer

warnings.filterwarnings("ignore", message=".*flex.*")


def small_nsa(**kw):
    base = dict(compress_block=8, compress_stride=4, sel_block=8, num_selected=4, window=12)
    base.update(kw)
    return NSAConfig(**base)


def small_model(attention="nsa", heads=4, kv_heads=2, **nsa_kw):
    return ModelConfig(dim=32, depth=2, heads=heads, kv_heads=kv_heads, dim_head=8, attention=attention,
                       nsa=small_nsa(**nsa_kw))


@pytest.mark.parametrize("attention,backend", [("nsa", "torch"), pytest.param("nsa", "flex", marks=pytest.mark.full),
                                               ("dense", "torch")])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (16, 1)])
def test_future_token_never_changes_earlier_outputs(attention, backend, heads, kv_heads):
    model = Transformer(small_model(attention, heads, kv_heads, backend=backend)).eval()
    x = torch.randint(0, 256, (2, 41))
    with torch.no_grad():
        ref, _ = model(x)
        for t in (0, 7, 8, 20, 40):
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % 256
            out, _ = model(y)
            assert torch.allclose(out[:, :t], ref[:, :t], atol=1e-5), f"position {t} leaked backwards"
            assert not torch.allclose(out[:, t:], ref[:, t:])


def test_bidirectional_sees_the_future():
    model = Transformer(small_model(causal=False)).eval()
    x = torch.randint(0, 256, (1, 30))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(model(x)[0][:, 0], model(y)[0][:, 0])


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1), (16, 1)])
def test_window_only_nsa_equals_dense(heads, kv_heads):
    """window >= T and gates passing only the window branch: NSA is dense causal attention."""
    T, dim, dh = 33, 32, 8
    nsa = SparseAttention(dim, heads, kv_heads, dh, small_nsa(window=64))
    with torch.no_grad():
        nsa.to_gates.bias.copy_(torch.tensor([-100.0, -100.0, 100.0]).repeat(heads))
    dense = DenseAttention(dim, heads, kv_heads, dh)
    dense.load_state_dict({k: v for k, v in nsa.state_dict().items() if k in dense.state_dict()})
    x = torch.randn(2, T, dim)
    assert torch.allclose(nsa(x), dense(x), atol=1e-5)


def _grads(model, x):
    model.zero_grad()
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0}


@pytest.mark.parametrize("nsa_kw", [{}, {"separate_kv": True}, {"shared_selection": False}, {"diff_topk": True},
                                    {"compress_net": "mean"}, {"compress_net": "conv"}, {"compress_net": "attn"},
                                    {"num_mem": 0}, {"num_mem": 3}])
def test_gradients_reach_every_parameter(nsa_kw):
    model = Transformer(small_model(**nsa_kw))
    grads = _grads(model, torch.randint(0, 256, (2, 50)))
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("diff_topk", [False, True])
def test_topn_differentiable_only_with_diff_topk(diff_topk):
    """With the compressed branch gated off, the compressor learns only through the top-n, which
    passes gradient only through the straight-through gate."""
    model = Transformer(small_model(diff_topk=diff_topk))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.to_gates.bias[0::3] = -100.0
    grads = _grads(model, torch.randint(0, 256, (2, 50)))
    compressor = sum(g.abs().sum() for n, g in grads.items() if "k_compress" in n)
    assert (compressor > 1e-6) == diff_topk


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (2, 1), (4, 1), (16, 1)])
def test_bf16_close_to_fp32(heads, kv_heads):
    model = Transformer(small_model(heads=heads, kv_heads=kv_heads))
    x = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        ref, _ = model(x)
        out, _ = copy.deepcopy(model).to(torch.bfloat16)(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.full  # flex attention runs eagerly (slowly) on CPU
@pytest.mark.parametrize("T", [1, 5, 8, 63, 70])
@pytest.mark.parametrize("shared", [True, False])
def test_torch_and_flex_backends_agree(T, shared):
    cfg = small_model(shared_selection=shared)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        ref, _ = model(x)
        cfg.nsa.backend = "flex"
        out, _ = model(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_triton_backend_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = Transformer(small_model(backend="triton"))
    with pytest.raises(RuntimeError, match="CUDA"):
        model(torch.randint(0, 256, (1, 9)))


def test_bad_input_shape_is_a_clear_error():
    model = Transformer(small_model())
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.randint(0, 256, (9,)))


@pytest.mark.full
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(small_model())
    x = torch.randint(0, 256, (4, 49))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


@pytest.mark.parametrize("heads,kv_heads,T", [(2, 2, 9), pytest.param(4, 2, 41, marks=pytest.mark.full),
                                              pytest.param(16, 1, 30, marks=pytest.mark.full)])
def test_triton_backend_matches_torch_forward_and_gradients(heads, kv_heads, T):
    """The whole model through the Triton kernels (interpreter on CPU) equals the references."""
    cfg = small_model(heads=heads, kv_heads=kv_heads)
    model = Transformer(cfg)
    x = torch.randint(0, 256, (2, T + 1))
    ref_logits = model(x[:, :-1], x[:, 1:])[0]
    ref = _grads(model, x)
    cfg.nsa.backend = "triton"
    logits = model(x[:, :-1], x[:, 1:])[0]
    got = _grads(model, x)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    for name, g in ref.items():
        assert torch.allclose(got[name], g, atol=1e-4, rtol=1e-3), name


@pytest.mark.full  # torch._dynamo
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_traces_without_graph_breaks(backend):
    """torch.compile sees the whole model as one graph: the kernels are registered custom ops and the
    backend lookup is plain module attribute access."""
    torch._dynamo.reset()
    model = Transformer(small_model(backend=backend))
    x = torch.randint(0, 256, (1, 40))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


def test_sparse_attention_built_directly_validates_its_config():
    # compress_stride 5 divides neither l = 8 nor l' = 8: constructed outside load_config, the module
    # would otherwise run and return finite, wrong outputs.
    with pytest.raises(ValueError, match="compress_stride"):
        SparseAttention(32, 4, 2, 8, small_nsa(compress_stride=5))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        SparseAttention(32, 4, 3, 8, small_nsa())
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        DenseAttention(32, 4, 3, 8)


@pytest.mark.parametrize("attn", [SparseAttention(32, 4, 2, 8, small_nsa()), DenseAttention(32, 4, 2, 8)],
                         ids=["nsa", "dense"])
@pytest.mark.parametrize("shape,match", [((5, 32), "batch, time, 32"), ((1, 5, 16), "batch, time, 32"),
                                         ((0, 5, 32), "no tokens"), ((1, 0, 32), "no tokens")])
def test_attention_input_errors_are_one_clear_message(attn, shape, match):
    with pytest.raises(ValueError, match=match):
        attn(torch.randn(*shape))
