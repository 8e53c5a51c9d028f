"""train.py end to end on CPU: smoke run, exact resume, non-finite steps, DDP (gloo, 2 processes),
atomic checkpoints, clear errors for bad input, plot_runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from nsa import checkpoint as C  # noqa: E402
from nsa import data as D  # noqa: E402
from nsa.config import load_config  # noqa: E402
from nsa.model import Transformer  # noqa: E402

TINY = [
    "model.dim=32", "model.depth=2", "model.heads=4", "model.kv_heads=2", "model.dim_head=8",
    "model.nsa.compress_block=8", "model.nsa.compress_stride=4", "model.nsa.sel_block=8",
    "model.nsa.num_selected=4", "model.nsa.window=16", "model.nsa.backend=torch",
    "train.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "train.log_every=1",
    "train.eval_every=3", "train.sample_every=0", "train.save_every=1000", "train.warmup_steps=2",
    "train.device=cpu", "log.wandb_mode=disabled",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and far faster than with two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "bytes.bin"
    path.write_bytes(bytes(D.synthetic_bytes(12_000)))
    return path


def args(corpus, out_dir, *extra):
    return ["--config", str(ROOT / "configs" / "smoke.yaml"), *TINY, "data.source=file", f"data.path={corpus}",
            f"train.out_dir={out_dir}", *extra]


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def test_smoke_run_end_to_end(corpus, tmp_path):
    out = tmp_path / "run"
    final = train.main(args(corpus, out, "train.max_steps=6", "train.sample_every=3", "train.sample_len=8"))
    recs = records(out)
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert any("val_bpb" in r for r in recs)
    assert sum("sample" in r for r in recs) == 2 and all(r["sample"].startswith("The ") for r in recs if "sample" in r)
    gates = [k for k in recs[0] if k.startswith("gate/")]
    assert sorted(gates) == sorted(f"gate/{i}/{b}" for i in range(2) for b in ("cmp", "slc", "win"))
    assert {"final/val_bpb", "final/test_bpb"} <= set(final) and recs[-1] == final
    assert final["final/val_bpb"] < 8.5
    # resolved config saved, loads back to the same Config
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["data"]["path"] == str(corpus)
    # checkpoint: the documented keys, and the model rebuilds from it
    ck = C.load_checkpoint(out)
    assert {"model", "optimizer", "scheduler", "step", "rng", "data", "config", "wandb_run_id"} <= set(ck)
    assert ck["step"] == 6 and ck["config"] == saved
    model, cfg = C.model_from_checkpoint(out / "ckpt.pt", "cpu")
    assert isinstance(model, Transformer) and not model.training
    x = torch.randint(0, 256, (1, 16))
    ref = Transformer(cfg.model)
    ref.load_state_dict(ck["model"])
    assert torch.equal(model(x)[0], ref.eval()(x)[0])


def test_resume_is_exact(corpus, tmp_path):
    """N steps, resume, N more == 2N straight; also after a crash past the last checkpoint."""
    common = ["train.max_steps=8", "train.eval_every=3"]
    train.main(args(corpus, tmp_path / "straight", *common))
    straight = train_losses(tmp_path / "straight")
    assert len(straight) == 8

    # extend a finished run: constant lr after warm-up, so the schedule does not depend on max_steps
    flat = ["train.min_lr=3e-3", "train.lr=3e-3"]
    train.main(args(corpus, tmp_path / "flat", *flat, "train.max_steps=8"))
    train.main(args(corpus, tmp_path / "split", *flat, "train.max_steps=4"))
    train.main(["--resume", str(tmp_path / "split"), "train.max_steps=8"])
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "flat")
    with pytest.raises(SystemExit, match="nothing to do"):
        train.main(["--resume", str(tmp_path / "split")])  # already at max_steps

    # a crash at step 7 after a checkpoint at step 4; resume with the same (cosine) config
    crash = tmp_path / "crash"
    real_get_batch = train.get_batch

    def failing_get_batch(*a, **kw):
        if kw["step"] == 6:
            raise RuntimeError("simulated crash")
        return real_get_batch(*a, **kw)

    train.get_batch = failing_get_batch
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(args(corpus, crash, *common, "train.save_every=4"))
    finally:
        train.get_batch = real_get_batch
    assert C.load_checkpoint(crash)["step"] == 4
    assert [s for s, _ in train_losses(crash)] == [1, 2, 3, 4, 5, 6]  # step 5 and 6 logged past the checkpoint
    train.main(["--resume", str(crash / "ckpt.pt")])
    assert train_losses(crash) == straight


def test_nonfinite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch, capsys):
    real_forward = Transformer.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if torch.is_grad_enabled() and targets is not None:
            calls["n"] += 1
            if calls["n"] in poisoned:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", forward)
    poisoned = {3}
    out = tmp_path / "nan"
    train.main(args(corpus, out, "train.max_steps=5", "train.max_nonfinite=2"))
    recs = records(out)
    assert [r["step"] for r in recs if "nonfinite" in r and "loss" not in r] == [3]
    assert [s for s, _ in train_losses(out)] == [1, 2, 4, 5]
    opt_state = C.load_checkpoint(out)["optimizer"]["state"]
    assert {int(s["step"]) for s in opt_state.values()} == {4}  # 5 steps, one update skipped
    assert all(torch.isfinite(p).all() for p in C.load_checkpoint(out)["model"].values())

    calls["n"] = 0
    poisoned = {2, 4}
    with pytest.raises(SystemExit, match="non-finite"):
        train.main(args(corpus, tmp_path / "nan2", "train.max_steps=6", "train.max_nonfinite=2"))


def test_ddp_gloo_two_processes(corpus, tmp_path):
    """torchrun, 2 CPU processes, gloo, with gradient accumulation (no_sync on the first micro-batch)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *args(corpus, out, "train.max_steps=3", "train.eval_every=2", "train.grad_accum=2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3]  # rank 0 alone logs: no duplicates
    assert C.load_checkpoint(out)["data"]["world_size"] == 2

    # step 1's loss is the mean of the two ranks' losses on their own batches with the initial model
    cfg = load_config(ROOT / "configs" / "smoke.yaml", TINY + ["data.source=file", f"data.path={corpus}"])
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    train_split = D.load_splits(cfg.data)["train"]
    per_batch = []
    for rank in (0, 1):
        for micro in (0, 1):
            x, y = D.get_batch(train_split, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.train.seed, step=0,
                               rank=rank, micro=micro)
            per_batch.append(model(x, y)[1].item())
    assert len(set(per_batch)) == 4  # each rank and micro-batch saw its own batch
    assert losses[0][1] == pytest.approx(sum(per_batch) / 4, rel=1e-5)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"model": {"w": torch.ones(3)}, "config": {"a": 1}, "step": 1}
    C.save_checkpoint(path, good)

    def broken_save(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 2})
    monkeypatch.undo()
    loaded = C.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_checkpoint_errors(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load_checkpoint(tmp_path)  # a directory without ckpt.pt
    C.save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.ones(1000)}, "config": {}})
    blob = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(C.CheckpointError, match="truncated or corrupt"):
        C.load_checkpoint(tmp_path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not an nsa checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["--config", "configs/smoke.yaml", "train.max_stepz=3"], "train.max_stepz"),
    (["--config", "configs/smoke.yaml", "data.source=file", "data.path=/nonexistent/file.txt"],
     "/nonexistent/file.txt does not exist"),
    (["--resume", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    ([], "--config"),
])
def test_bad_input_gives_one_clear_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.cli(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_requested_on_cpu_machine(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.cli(["--config", "configs/smoke.yaml", "train.device=cuda"]) != 0
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_triton_backend_on_cpu_machine(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["--config", "configs/smoke.yaml", "model.nsa.backend=triton", "log.wandb_mode=disabled",
            f"train.out_dir={tmp_path}"]
    assert train.cli(argv) != 0
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Traceback" not in err


def test_plot_runs_writes_png(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_runs

    for name in ("a", "b"):
        train.main(args(corpus, tmp_path / name, "train.max_steps=3", "train.eval_every=1"))
    out = tmp_path / "plots" / "cmp.png"
    plot_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot_runs.main([str(tmp_path / "nothing"), "--out", str(out)])


def test_wandb_logging_and_resumed_run_id(corpus, tmp_path, monkeypatch):
    """wandb (faked here) gets the resolved config, metrics by step incl. NSA gates, and the same run id on resume."""
    import types

    calls = []

    class FakeRun:
        id = "abc123"
        summary = {}

        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "wb"
    train.main(args(corpus, out, "train.max_steps=2", "log.wandb_mode=offline", "log.wandb_project=p"))
    init_kw = calls[0][1]
    assert init_kw["mode"] == "offline" and init_kw["project"] == "p" and init_kw["id"] is None
    assert init_kw["config"]["train"]["max_steps"] == 2 and init_kw["name"] == "wb"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "loss" in c[2]] == [1, 2]
    assert "gate/1/slc" in logged[0][2] and "final/val_bpb" in logged[-1][2]
    assert calls[-1] == ("finish",)
    assert C.load_checkpoint(out)["wandb_run_id"] == "abc123"

    calls.clear()
    train.main(["--resume", str(out), "train.max_steps=3"])
    assert calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log" and "loss" in c[2]] == [3]


def test_wandb_missing_is_a_clear_error(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert train.cli(args(corpus, tmp_path / "x", "train.max_steps=1", "log.wandb_mode=offline")) != 0
    assert "pip install wandb" in capsys.readouterr().err
