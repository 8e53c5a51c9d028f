"""Cached decoding (prefill + decode steps over preallocated caches) against the full forward."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from nsa.cache import ModelCache
from nsa.config import Config, ModelConfig, NSAConfig, to_dict
from nsa.checkpoint import CheckpointError
from nsa.generation import generate, load_model, sample
from nsa.model import Transformer
from nsa.ops.common import completes_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(attention="nsa", heads=4, kv_heads=1, separate_kv=False, num_mem=1, sel_block=8, num_selected=4,
         shared=True, compress_net="mlp"):
    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=sel_block, num_selected=num_selected, window=16,
                    num_mem=num_mem, separate_kv=separate_kv, shared_selection=shared, compress_net=compress_net,
                    backend="torch")
    return ModelConfig(dim=32, depth=2, heads=heads, kv_heads=kv_heads, dim_head=8, attention=attention, nsa=nsa)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # break the zero inits (gates, position embeddings) so every branch matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


CASES = [
    dict(),
    dict(heads=4, kv_heads=4),  # G = 1
    dict(separate_kv=True),
    dict(num_mem=0),
    dict(num_mem=0, separate_kv=True, heads=4, kv_heads=4),
    dict(sel_block=16, num_selected=5),  # overlap mapping with l' > l
    dict(shared=False, num_selected=5),  # per-head selection
    dict(compress_net="mean"),
    dict(attention="dense"),
]


# The Triton decode step (interpreter on CPU): the default config in the default tier; G = 1 with
# separate_kv and no memory, l' > l, and per-head selection in the full tier.
TRITON_CASES = [dict(), dict(num_mem=0, separate_kv=True, heads=4, kv_heads=4), dict(sel_block=16, num_selected=5),
                dict(shared=False, num_selected=5)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case_id(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "default"


# Through the Triton kernels (the interpreter on CPU) every case is in the full tier. The default tier
# holds the torch path to the full forward here and the Triton decode path to the torch one
# (test_decode_kernel.py::test_model_decode_through_triton_matches_torch).
@pytest.mark.parametrize("backend, case", [("torch", c) for c in CASES] +
                         [pytest.param("triton", c, marks=pytest.mark.full) for c in TRITON_CASES],
                         ids=[f"torch-{_case_id(c)}" for c in CASES] + [f"triton-{_case_id(c)}" for c in TRITON_CASES])
def test_cached_logits_equal_full_forward(backend, case):
    # Batch 2, fp32: the prefill and every decode step through the backend's decode op give the full
    # forward's logits (the parallel ops run on the torch backend: they are tested on their own).
    device = DEVICE if backend == "triton" else "cpu"
    model = build(tiny(**case)).to(device)
    nsa = model.cfg.nsa  # the one NSAConfig every layer reads
    B, N = 2, 36
    tol = dict(atol=2e-5, rtol=1e-4) if backend == "torch" else dict(atol=1e-4, rtol=1e-4)
    # Prompts ending before l, inside the first blocks, past l' and w; the N steps cross l, every d,
    # l' and w again. (The parallel forward cannot take a prompt shorter than l with num_mem = 0: it
    # has no compressed key at all.)
    for T in (1, 13) if case.get("num_mem", 1) or case.get("attention") == "dense" else (8,):
        idx = torch.randint(0, 256, (B, T + N), device=device)
        with torch.no_grad():
            full, _ = model(idx)
            cache = ModelCache(model, B, T + N)
            got = model.prefill(idx[:, :T], cache)
            torch.testing.assert_close(got, full[:, :T], atol=2e-5, rtol=1e-4)
            nsa.backend = backend
            try:
                for s in range(N):
                    logits = model.decode_step(idx[:, T + s], cache)
                    torch.testing.assert_close(logits, full[:, T + s], **tol, msg=f"T={T} step {s}")
            finally:
                nsa.backend = "torch"
            assert cache.lengths.tolist() == [T + N] * B


@pytest.mark.parametrize("case", [dict(), dict(separate_kv=True, num_mem=0)], ids=_case_id)
def test_skipping_compression_where_no_block_finishes_changes_nothing(case):
    # generate's rule: compress only on steps whose token finishes a compressed block. Same logits and
    # same compressed caches as compressing (masked) on every step, across many block boundaries.
    model = build(tiny(**case))
    l, d = model.cfg.nsa.compress_block, model.cfg.nsa.compress_stride
    B, T, N = 2, 9, 30
    idx = torch.randint(0, 256, (B, T + N))
    with torch.no_grad():
        always, skipping = ModelCache(model, B, T + N), ModelCache(model, B, T + N)
        model.prefill(idx[:, :T], always)
        model.prefill(idx[:, :T], skipping)
        skipped = 0
        for s in range(N):
            finishes = completes_block(T + s, l, d)
            skipped += not finishes
            want = model.decode_step(idx[:, T + s], always)
            got = model.decode_step(idx[:, T + s], skipping, compress=finishes)
            assert torch.equal(got, want), f"step {s}"
    assert 0 < skipped < N
    for a, b in zip(always.layers, skipping.layers):
        assert torch.equal(a.ck, b.ck) and torch.equal(a.cv, b.cv)


def test_greedy_text_same_with_and_without_cache():
    model = build(tiny(separate_kv=True))
    prompt = torch.tensor([list(b"Hello, world")] * 2)
    a, stats = generate(model, prompt, 40, greedy=True)
    b, _ = generate(model, prompt, 40, greedy=True, use_cache=False)
    assert torch.equal(a, b)
    assert stats["prefill_ms"] >= 0 and stats["tokens_per_s"] > 0


def test_sampling_seeded_and_filters():
    logits = torch.randn(3, 256)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample(logits, 0.8, 20, 0.9, generator=g1), sample(logits, 0.8, 20, 0.9, generator=g2))
    assert torch.equal(sample(logits, greedy=True), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    top = logits.topk(3, dim=-1).indices
    for _ in range(20):
        tok = sample(logits, 1.0, top_k=3, generator=g)
        assert (tok[:, None] == top).any(-1).all()
    peaked = torch.full((1, 256), -10.0)
    peaked[0, 7] = 10.0
    assert sample(peaked, 1.0, top_p=0.5, generator=g).item() == 7


def _save_tiny_checkpoint(path, attention="nsa"):
    cfg = Config(model=tiny(attention=attention))
    cfg.train.seq_len = 64
    model = build(cfg.model)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return model


def _cli_inprocess(capsys, *args):
    """generate.py's main() in this process (fast); returns (exit code, stdout, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT,
                          env={**os.environ,
                               "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))},
                          timeout=120)


def test_generate_cli_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    model = _save_tiny_checkpoint(ckpt)
    r = _cli("--checkpoint", str(ckpt), "--prompt", "abc", "--max-new-tokens", "12", "--greedy", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out, _ = generate(model, torch.tensor([list(b"abc")]), 12, greedy=True)
    assert r.stdout.startswith(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    assert "prefill" in r.stdout and "tokens/s" in r.stdout
    rc, out, err = _cli_inprocess(capsys, "--checkpoint", str(ckpt), "--prompt", "abc", "--max-new-tokens", "12",
                                  "--greedy", "--no-cache", "--device", "cpu")
    assert rc == 0, err
    assert out.splitlines()[0] == r.stdout.splitlines()[0]
    prompt = tmp_path / "p.txt"
    prompt.write_bytes(b"xy")
    rc, out, err = _cli_inprocess(capsys, "--checkpoint", str(ckpt), "--prompt-file", str(prompt), "--max-new-tokens",
                                  "5", "--num-samples", "2", "--seed", "3", "--top-k", "10", "--top-p", "0.9",
                                  "--temperature", "0.7", "--device", "cpu")
    assert rc == 0, err
    assert out.count("--- sample") == 2


def test_generate_cli_errors(tmp_path, capsys, monkeypatch):
    def fails(*args):
        rc, _, err = _cli_inprocess(capsys, *args, "--device", "cpu")
        assert rc != 0
        return err

    assert "no checkpoint at" in fails("--checkpoint", str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    assert "not an nsa checkpoint" in fails("--checkpoint", str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in fails("--checkpoint", str(junk))
    ckpt = tmp_path / "ckpt.pt"
    _save_tiny_checkpoint(ckpt)
    assert "longer than the model context" in fails("--checkpoint", str(ckpt), "--prompt", "x" * 65)
    assert "empty" in fails("--checkpoint", str(ckpt), "--prompt", "")
    assert "--max-new-tokens" in fails("--checkpoint", str(ckpt), "--max-new-tokens", "0")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert "needs a CUDA device" in fails("--checkpoint", str(ckpt), "--backend", "triton")


def test_generate_cli_rejects_bad_sampling_and_device_flags(tmp_path, capsys):
    # Each bad value ends in one line naming the flag (exit code 2), before any model is loaded.
    ckpt = tmp_path / "ckpt.pt"
    _save_tiny_checkpoint(ckpt)
    bad = [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5"),
           ("--top-k", "-3"), ("--max-context", "-1"), ("--device", "tpu"), ("--device", "cuda:x")]
    if not torch.cuda.is_available():
        bad += [("--cuda-graph",), ("--device", "cuda")]
    for flag in bad:
        rc, out, err = _cli_inprocess(capsys, "--checkpoint", str(ckpt), "--max-new-tokens", "3", *flag)
        assert rc == 2 and not out, (flag, rc, out)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and flag[0] in err, (flag, err)


def test_generate_cli_temperature_zero_is_greedy(tmp_path, capsys):
    # --temperature 0 is documented as greedy (--help) and decodes exactly like --greedy.
    ckpt = tmp_path / "ckpt.pt"
    _save_tiny_checkpoint(ckpt)
    with pytest.raises(SystemExit):
        _cli_inprocess(capsys, "--help")
    assert "0 means greedy" in " ".join(capsys.readouterr().out.split())
    args = ("--checkpoint", str(ckpt), "--prompt", "abc", "--max-new-tokens", "10", "--device", "cpu")
    rc0, zero, err = _cli_inprocess(capsys, *args, "--temperature", "0", "--seed", "1")
    rc1, greedy, _ = _cli_inprocess(capsys, *args, "--greedy", "--seed", "2")
    assert rc0 == rc1 == 0, err
    assert zero.splitlines()[0] == greedy.splitlines()[0]


def test_batch_generation_equals_single_runs_greedy():
    # Rows of one batch decode independently: greedy continuations of different prompts as one batch
    # equal each prompt generated alone.
    model = build(tiny(separate_kv=True))
    prompts = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    batch, _ = generate(model, prompts, 20, greedy=True)
    for i in range(3):
        alone, _ = generate(model, prompts[i:i + 1], 20, greedy=True)
        assert torch.equal(batch[i:i + 1], alone), f"row {i}"


def test_generate_cli_num_samples_is_one_batch(tmp_path, capsys, monkeypatch):
    # --num-samples N: one cache of batch N; greedy gives N copies of the single-sample text, sampling
    # (one seeded generator for the batch) N different samples.
    import nsa.cache

    batches = []

    class Recorded(nsa.cache.ModelCache):
        def __init__(self, model, batch, *args, **kw):
            batches.append(batch)
            super().__init__(model, batch, *args, **kw)

    monkeypatch.setattr(nsa.cache, "ModelCache", Recorded)
    ckpt = tmp_path / "ckpt.pt"
    _save_tiny_checkpoint(ckpt)
    args = ("--checkpoint", str(ckpt), "--prompt", "abc", "--max-new-tokens", "24", "--device", "cpu")

    def texts(out):  # the printed samples (they may hold newlines), without the stats line
        body = out.rsplit("\n\n[", 1)[0] + "\n"
        return [t[:-1] for t in re.split(r"--- sample \d+ ---\n", body)[1:]] or [body[:-1]]

    rc, single, err = _cli_inprocess(capsys, *args, "--greedy")
    assert rc == 0, err
    rc, greedy, err = _cli_inprocess(capsys, *args, "--greedy", "--num-samples", "3")
    assert rc == 0, err
    assert texts(greedy) == texts(single) * 3
    rc, sampled, err = _cli_inprocess(capsys, *args, "--num-samples", "3", "--seed", "4")
    assert rc == 0, err
    assert len(set(texts(sampled))) == 3
    assert batches == [1, 3, 3]


def test_load_model_incompatible(tmp_path):
    cfg = Config(model=tiny())
    model = build(cfg.model)
    other = dataclasses.replace(cfg.model, dim=48)
    path = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(Config(model=other))}, path)
    with pytest.raises(CheckpointError, match="do not match|shape"):
        load_model(str(path))
    torch.save({"model": model.state_dict(), "config": {"model": {"nonsense": 1}}}, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(str(path))


@pytest.mark.gpu
def test_gpu_bf16_cached_decoding_matches_full_forward():
    """On CUDA in bf16: Triton decode steps vs the full Triton forward, prompts and steps crossing the
    l, d, l' and w boundaries. bf16 kernels round differently and may flip a near-tied top-n pick,
    so this bounds the typical error and the argmax agreement instead of requiring equality."""
    from nsa.generation import cast_model

    cfg = ModelConfig(dim=256, depth=2, heads=8, kv_heads=2, dim_head=64,
                      nsa=NSAConfig(compress_block=32, compress_stride=16, sel_block=64, num_selected=6, window=128))
    model = cast_model(build(cfg).cuda(), torch.bfloat16)
    B, T, N = 2, 301, 160
    idx = torch.randint(0, 256, (B, T + N), device="cuda")
    with torch.no_grad():
        full = model(idx)[0].float()
        cache = ModelCache(model, B, T + N)
        model.prefill(idx[:, :T], cache)
        steps = torch.stack([model.decode_step(idx[:, T + s], cache).float() for s in range(N)], 1)
    want = full[:, T:]
    rel = ((steps - want).abs().amax(-1) / want.std(-1)).flatten()
    agree = (steps.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"bf16 decode vs forward: median rel err {rel.median():.4f}, max {rel.max():.4f}, "
          f"argmax agreement {agree:.4f}")
    assert rel.median() < 0.05 and agree > 0.95


@pytest.mark.full  # torch.compile
def test_compiled_cache_append_writes_in_place():
    # torch.compile'd decode steps write the caches in place: a cache-sized buffer in the generated
    # code would mean a copy of the whole cache (and back) on every token, growing with the context.
    from torch._inductor.utils import run_and_get_code

    from nsa.cache import ModelCache
    from nsa.config import ModelConfig, NSAConfig
    from nsa.model import Transformer

    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=16, separate_kv=True)
    model = Transformer(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).eval()
    B, S = 2, 97
    layer, attn = ModelCache(model, B, S).layers[0], model.blocks[0].attn
    pos = torch.tensor([40, 7])
    k, v = torch.randn(B, 1, 2, 16), torch.randn(B, 1, 2, 16)

    def append(pos, k, v):
        layer.append(pos, k, v, k, v, k, v)
        attn.append_compressed(layer, pos)

    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(append), pos, k, v)
    assert not any(f"(({B}, {S}," in line for code in codes for line in code.splitlines() if "empty_strided" in line)
    torch.testing.assert_close(layer.k_slc[torch.arange(B), pos], k[:, 0])
    torch.testing.assert_close(layer.v_win[torch.arange(B), pos % layer.v_win.shape[1]], v[:, 0])


@pytest.mark.full  # torch.compile
def test_generate_compiled_equals_eager_greedy():
    # generate.py --compile: the compiled decode step gives the eager step's greedy continuation.
    from nsa.model import Transformer

    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=16)
    model = Transformer(ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).eval()
    prompt = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    eager, _ = generate(model, prompt, 12, greedy=True)
    compiled, _ = generate(model, prompt, 12, greedy=True, compile=True)
    assert torch.equal(compiled, eager)


# Prompt + new-token lengths of two generations: a multiple of 16 and not (Triton specialises integer
# arguments on that), different cache capacities; the same capacity bucket of the decode kernels (and,
# below 32 selection blocks, the same power of two of the prompt's blocks for the tile-union kernel).
LENGTHS = [(192, 16), (250, 37)]


@pytest.mark.full  # 20 s of torch.compile on CPU; the Triton kernels' compile keys are checked in the default tier
def test_compiled_step_does_not_recompile_for_a_new_length(monkeypatch):
    # generate's compiled decode step is compiled for any cache capacity: a second generation of
    # another prompt and cache length reuses it (dynamo's tracing only: no backend compile on CPU).
    import functools

    import torch._dynamo

    model = build(tiny())
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    (T1, N1), (T2, N2) = LENGTHS
    generate(model, torch.randint(0, 256, (2, T1)), N1, greedy=True, compile=True)
    # config.patch, not monkeypatch: pytest >= 9.2 undoes a patched attribute of torch's config modules by
    # deleting it, which breaks every later compile in the process.
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, _ = generate(model, torch.randint(0, 256, (2, T2)), N2, greedy=True, compile=True)
    assert out.shape == (2, T2 + N2)


@pytest.mark.gpu
def test_gpu_generate_compiles_nothing_for_a_new_length():
    # Counts Triton compilations (ours: the prefill's kernels and the four decode kernels; Triton's
    # compile hook) and the graphs dynamo compiles (the compiled step, whose kernels are Inductor's)
    # across generations of two lengths, graphed then compiled: the second length compiles nothing.
    import triton
    from torch._dynamo.utils import counters

    from nsa.generation import cast_model

    hooks = triton.knobs.runtime
    cfg = ModelConfig(dim=128, depth=2, heads=8, kv_heads=2, dim_head=64,
                      nsa=NSAConfig(compress_block=32, compress_stride=16, sel_block=64, num_selected=4, window=64,
                                    backend="triton"))
    model = cast_model(build(cfg).cuda(), torch.bfloat16)
    compiled = []
    old = hooks.jit_post_compile_hook
    hooks.jit_post_compile_hook = lambda *a, **k: compiled.append(getattr(k.get("fn"), "name", "?"))
    try:
        kernels, graphs = [], []
        for compile in (False, True):
            for T, N in LENGTHS:
                before, graphs_before = len(compiled), counters["stats"]["unique_graphs"]
                generate(model, torch.randint(0, 256, (1, T), device="cuda"), N, greedy=True, compile=compile,
                         cuda_graph=True)
                kernels.append(compiled[before:])
                graphs.append(counters["stats"]["unique_graphs"] - graphs_before)
    finally:
        hooks.jit_post_compile_hook = old
    assert kernels[0] and not any(kernels[1:]), kernels  # the compiled step's first length: ours compiled already
    assert graphs[2] > 0 and graphs[3] == 0, graphs


def test_decode_appends_each_compressed_block_when_it_completes():
    # Token by token, the attention layer writes compressed block i exactly when its last token
    # i * d + l - 1 arrives, equal to the parallel compressor's block i; the cache itself only stores.
    model = build(tiny(separate_kv=True))
    attn, B, S = model.blocks[0].attn, 2, 29
    cache = ModelCache(model, B, S)
    assert [type(layer).__name__ for layer in cache.layers] == ["SparseCache"] * 2
    assert [type(layer).__name__ for layer in ModelCache(build(tiny(attention="dense")), B, S).layers] == \
        ["DenseCache"] * 2
    layer, mem = cache.layers[0], attn.cfg.num_mem
    k, v = torch.randn(B, S, 1, 8), torch.randn(B, S, 1, 8)
    with torch.no_grad():
        want_k, want_v = attn.k_compress(k), attn.v_compress(v)
        for t in range(S):
            pos = torch.full((B,), t)
            before = layer.ck.clone()
            layer.append(pos, k[:, t:t + 1], v[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
            assert torch.equal(layer.ck, before), "append must not touch the compressed rows"
            attn.append_compressed(layer, pos)
            done = (t + 1 - 8) // 4 + 1 if t >= 7 else 0  # blocks complete after token t
            torch.testing.assert_close(layer.ck[:, mem:mem + done], want_k[:, :done])
            torch.testing.assert_close(layer.cv[:, mem:mem + done], want_v[:, :done])
            assert not layer.ck[:, mem + done:].any(), f"t={t}: a row written before its block completed"
