"""The Triton decode kernel (nsa/ops/decode.py) against the reference decode step.

On CPU this runs under TRITON_INTERPRET=1 (set by conftest.py), with small shapes."""

import pytest
import torch

from nsa.ops import reference
from nsa.ops.common import NSAParams, ceil_div

decode = pytest.importorskip("nsa.ops.decode")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs and scratch start as NaN (floats) or -7 (ints): an element the kernels forget to write,
    or read before writing, shows in the result."""
    def empty(shape, dtype, device):
        return torch.full(shape if isinstance(shape, tuple) else (shape,), float("nan") if dtype.is_floating_point
                          else -7, dtype=dtype, device=device)

    monkeypatch.setattr(decode, "_empty", empty)


def _inputs(B, H, G, D, S, num_mem, block, stride, window_slots, t, dtype, seed=0, dim=40):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)

    HQ = H * G
    nc = max(0, (S - block) // stride + 1)
    q, q_rot = rnd(B, HQ, D, scale=2.0), rnd(B, HQ, D, scale=2.0)
    ck, cv = rnd(B, num_mem + nc, H, D), rnd(B, num_mem + nc, H, D)
    k_slc, v_slc = rnd(B, S, H, D), rnd(B, S, H, D)
    if window_slots is None:
        k_win, v_win = k_slc, v_slc
    else:
        k_win, v_win = rnd(B, window_slots, H, D), rnd(B, window_slots, H, D)
    # The layer input and its gate projection (dim not a power of two: a masked chunk)
    x, w_gate, b_gate = rnd(B, dim), rnd(3 * HQ, dim, scale=dim**-0.5), rnd(3 * HQ)
    t = torch.tensor(t, device=DEVICE)
    return q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, x, w_gate, b_gate, t


def _sorted_idx(idx):
    big = torch.iinfo(torch.int32).max
    s = torch.where(idx < 0, big, idx).sort(-1).values
    return torch.where(s == big, -1, s)


CASES = [
    # G, num_mem, (l, d, l'), ring window slots (None: the selection cache), shared selection
    (1, 1, (8, 4, 8), None, True),
    (2, 0, (8, 4, 16), 16, True),
    (4, 1, (8, 4, 16), None, True),
    (16, 1, (8, 8, 8), 16, True),
    (4, 1, (8, 4, 16), None, False),
]


def _force_splits(monkeypatch, nc_split, w_split, s_split):
    """Fixed splits (compressed chunks, window chunks, selection programs) per pair, and chunks that are
    no multiple of the tile, so one tile straddles two chunks and some slots stay unused."""
    monkeypatch.setattr(decode, "_plan", lambda *args: (nc_split, w_split, s_split))
    monkeypatch.setattr(decode, "_chunk", lambda length, chunks, granule: ceil_div(max(length, 1), chunks))
    # The gate logits in several feature slots (the last one part masked) and, where the dot allows a
    # tile of 2 sequences (the interpreter), several sequence chunks.
    monkeypatch.setattr(decode, "GATE_CHUNK", 16)
    monkeypatch.setattr(decode, "GATE_K", 16)
    if DEVICE == "cpu":
        monkeypatch.setattr(decode, "GATE_B", 2)


def _case_id(c):
    return f"G{c[0]}-mem{c[1]}-l{c[2]}-ring{c[3]}-shared{c[4]}"


SPLITS = [None, (3, 2, 2), (7, 5, 3)]
FP32, BF16 = torch.float32, torch.bfloat16
# Default tier: every case once in fp32, the forced splits and bf16 on one case each; the full tier
# crosses them all.
QUICK = [(c, FP32, None) for c in CASES] + [(CASES[2], FP32, s) for s in SPLITS[1:]] + [(CASES[1], BF16, (3, 2, 2))]
FULL = [(c, d, s) for c in CASES for d in (FP32, BF16) for s in SPLITS if (c, d, s) not in QUICK]


def _sweep_id(x):
    case, dtype, splits = x
    split = "auto" if splits is None else "split%d-%d-%d" % splits
    return f"{_case_id(case)}-{'fp32' if dtype == FP32 else 'bf16'}-{split}"


@pytest.mark.parametrize("case, dtype, splits", QUICK + [pytest.param(*x, marks=pytest.mark.full) for x in FULL],
                         ids=[_sweep_id(x) for x in QUICK + FULL])
def test_decode_kernel_matches_reference(case, dtype, splits, monkeypatch):
    # splits = (compressed chunks, window chunks, selection programs) per pair: the partials and their merge, including
    # chunks that start past the current length (t = 3 with 7 chunks) and so must stay empty.
    if splits is not None:
        _force_splits(monkeypatch, *splits)
    G, num_mem, (block, stride, sel_block), ring, shared = case
    B, H, D, S, window, n = 3, 2, 16, 64, 16, 4
    # t crosses the block boundaries: before l - 1, at l - 1, mid-sequence, the last position
    t = [3, block - 1, 40] if num_mem else [block - 1, 30, S - 1]
    args = _inputs(B, H, G, D, S, num_mem, block, stride, ring, t, dtype)
    p = NSAParams(compress_block=block, compress_stride=stride, sel_block=sel_block, num_mem=num_mem, num_selected=n,
                  window=window, shared_selection=shared)
    o_ref, idx_ref = reference.decode_attention(*args, p, return_indices=True)
    o, idx = decode.decode_attention(*args, p, return_indices=True)
    assert torch.equal(_sorted_idx(idx.cpu()), idx_ref.cpu())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o.float().cpu(), o_ref.float().cpu(), **tol)


def test_decode_rejects_a_gate_projection_of_the_wrong_shape():
    args = list(_inputs(1, 1, 4, 16, 32, 1, 8, 4, None, [20], torch.float32))
    p = NSAParams(compress_block=8, compress_stride=4, sel_block=8, num_selected=4, window=16)
    args[9] = args[9][:-1]  # w_gate: 3 * HQ - 1 rows
    with pytest.raises(ValueError, match="gate projection"):
        decode.decode_attention(*args, p)


def test_decode_kernel_empty_compressed_set_is_finite():
    # num_mem = 0 and t < l - 1: no compressed key at all, o_cmp must be 0, not NaN.
    args = _inputs(1, 1, 4, 16, 32, 0, 8, 4, None, [2], torch.float32)
    p = NSAParams(compress_block=8, compress_stride=4, sel_block=8, num_mem=0, num_selected=4, window=16)
    o = decode.decode_attention(*args, p)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, reference.decode_attention(*args, p), atol=1e-5, rtol=1e-5)


def test_model_decode_through_triton_matches_torch():
    # The whole cached decode path with backend 'triton' (interpreter on CPU) against backend 'torch'.
    from nsa.cache import ModelCache
    from nsa.config import ModelConfig, NSAConfig
    from nsa.model import Transformer

    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=16, backend="torch",
                    separate_kv=True)
    model = Transformer(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 256, (2, 30), device=DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        nsa.backend = backend
        cache = ModelCache(model, 2, 30)
        with torch.no_grad():
            model.prefill(idx[:, :10], cache) if backend == "torch" else _prefill_torch(model, idx[:, :10], cache)
            outs.append(torch.stack([model.decode_step(idx[:, i], cache) for i in range(10, 30)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def _prefill_torch(model, prompt, cache):
    # The prefill forward itself uses the parallel ops; keep those on the reference here.
    nsa = model.blocks[0].attn.cfg
    nsa.backend = "torch"
    out = model.prefill(prompt, cache)
    nsa.backend = "triton"
    return out


@pytest.mark.full  # torch.compile
def test_compiled_decode_step_is_one_graph_and_matches_eager():
    # generate.py --compile: the whole decode step, Triton decode op included (a custom op), compiles
    # without a graph break (fullgraph=True raises on one) and gives the eager step's logits.
    from nsa.cache import ModelCache
    from nsa.config import ModelConfig, NSAConfig
    from nsa.model import Transformer

    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=16, backend="torch")
    model = Transformer(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).to(DEVICE).eval()
    idx = torch.randint(0, 256, (2, 24), device=DEVICE)
    caches = [ModelCache(model, 2, 24) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model.prefill(idx[:, :18], cache)
        nsa.backend = "triton"
        step = torch.compile(model.decode_step, fullgraph=True)
        eager = torch.stack([model.decode_step(idx[:, i], caches[0]) for i in range(18, 24)])
        compiled = torch.stack([step(idx[:, i], caches[1]) for i in range(18, 24)])
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.full  # ahead-of-time compile
def test_decode_kernels_compile_for_sm90_ahead_of_time():
    # bf16 paper setting (G = 16, D = 128) and fp32 with G = 4, D = 64, per-head selection.
    from kernel_checks import compile_launches

    call = """
from nsa.ops.common import NSAParams
mod.num_sms = lambda index: 132  # plan the launches as on an H100
for dtype, HQ, H, D, shared in [(torch.bfloat16, 64, 4, 128, True), (torch.float32, 8, 2, 64, False)]:
    B, S = 2, 4096
    nc = (S - 32) // 16 + 1
    x = lambda *shape: torch.zeros(*shape, dtype=dtype)
    mod.decode_attention(x(B, HQ, D), x(B, HQ, D), x(B, 1 + nc, H, D), x(B, 1 + nc, H, D), x(B, S, H, D),
                         x(B, S, H, D), x(B, 512, H, D), x(B, 512, H, D), x(B, 1024), x(3 * HQ, 1024), x(3 * HQ),
                         torch.full((B,), S - 1), NSAParams(shared_selection=shared))
"""
    assert compile_launches("nsa.ops.decode", ["_partials_kernel", "_importance_kernel", "_select_kernel",
                                               "_combine_kernel"], call, 90) == 8


@pytest.mark.parametrize("shared", [True, False])
def test_decode_kernel_long_cache_matches_reference(shared):
    # 1100 positions of 8-token selection blocks: 138 blocks, so the importance runs in several chunks
    # of 128 blocks and the top-n walks a 256-key vector; t in the first chunk, across, at the end. A
    # layer input of 1100 features: the gates' dot products run over two chunks of 1024.
    args = _inputs(3, 1, 4, 16, 1100, 1, 8, 4, None, [100, 1030, 1099], torch.float32, seed=3, dim=1100)
    p = NSAParams(compress_block=8, compress_stride=4, sel_block=8, num_mem=1, num_selected=8, window=32,
                  shared_selection=shared)
    o_ref, idx_ref = reference.decode_attention(*args, p, return_indices=True)
    o, idx = decode.decode_attention(*args, p, return_indices=True)
    assert torch.equal(_sorted_idx(idx.cpu()), idx_ref.cpu())
    torch.testing.assert_close(o.cpu(), o_ref.cpu(), atol=1e-5, rtol=1e-5)


class _KeyRecorder:
    """Stands in for a Triton kernel: records each launch's compile key (its constexprs and the
    specialisation Triton gives every other argument: type, == 1, divisible by 16) and launches it."""

    def __init__(self, kernel, keys):
        self.kernel, self.keys = kernel, keys
        fixed = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
        self.unspecialised = set(fixed or ())

    def __getitem__(self, grid):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        def launch(*args, **kw):
            names = self.kernel.arg_names[:len(args)]
            spec = tuple(native_specialize_impl(BaseBackend, a, False, n not in self.unspecialised, True)
                         for n, a in zip(names, args))
            self.keys.add((self.kernel.__name__, spec, tuple(sorted(kw.items()))))
            return self.kernel[grid](*args, **kw)

        return launch


def test_new_prompt_and_cache_lengths_compile_nothing_new(monkeypatch):
    # Two generations of different prompt and new-token lengths (so different cache capacities, a
    # window ring of another size, other compressed rows) launch the decode kernels with the same
    # compile keys: nothing is compiled again for the second on a GPU.
    from nsa.config import ModelConfig, NSAConfig
    from nsa.generation import generate
    from nsa.model import Transformer

    keys = set()
    for name in ("_partials_kernel", "_importance_kernel", "_select_kernel", "_combine_kernel"):
        monkeypatch.setattr(decode, name, _KeyRecorder(getattr(decode, name), keys))
    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=32, backend="triton",
                    separate_kv=True)
    model = Transformer(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).to(DEVICE).eval()

    def prefill(idx, cache):  # the parallel forward on the reference ops (the interpreter is slow)
        nsa.backend = "torch"
        try:
            return Transformer.prefill(model, idx, cache)
        finally:
            nsa.backend = "triton"

    monkeypatch.setattr(model, "prefill", prefill)
    seen = []
    for T, new in ((9, 5), (21, 8)):  # cache capacities 14 and 29, so window rings of 14 and 29 slots
        generate(model, torch.randint(0, 256, (2, T), device=DEVICE), new, greedy=True)
        seen.append(set(keys))
    assert len(seen[0]) == 4
    assert seen[1] == seen[0], f"new compile keys: {seen[1] - seen[0]}"


def test_new_prompt_length_compiles_no_new_prefill_kernel(monkeypatch):
    # The prefill's Triton forward kernels (compressed and window range attention, top-n, tile unions,
    # selection) launched for prompts of 48 and 57 tokens (a multiple of 16 and not; 3 and 4 selection
    # blocks, one power of two for the tile-union width) get the same compile keys: the lengths are
    # not specialised.
    from nsa.config import ModelConfig, NSAConfig
    from nsa.model import Transformer
    from nsa.ops import range_attention, selection, topn

    keys = set()
    for mod, name in ((range_attention, "_range_fwd_kernel"), (topn, "_topn_kernel"),
                      (selection, "_sel_fwd_kernel"), (selection, "_tile_union_kernel")):
        monkeypatch.setattr(mod, name, _KeyRecorder(getattr(mod, name), keys))
    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=64, backend="triton")
    model = Transformer(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).to(DEVICE).eval()
    seen = []
    with torch.no_grad():
        for T in (48, 57):
            model(torch.randint(0, 256, (1, T), device=DEVICE))
            seen.append(set(keys))
    assert len(seen[0]) == 5  # range attention twice: compressed and window
    assert seen[1] == seen[0], f"new compile keys: {seen[1] - seen[0]}"
