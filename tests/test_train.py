"""train.py end to end on CPU: smoke run, exact resume, non-finite steps, DDP (gloo, 2 processes),
atomic checkpoints, clear errors for bad input that leave earlier runs intact, the clocks."""

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

import plot_runs  # noqa: E402
import train  # noqa: E402
from nsa import checkpoint as C  # noqa: E402
from nsa import data as D  # noqa: E402
from nsa.config import load_config  # noqa: E402
from nsa.model import Transformer, bits_per_byte  # noqa: E402

TINY = [
    "model.dim=32", "model.depth=2", "model.heads=4", "model.kv_heads=2", "model.dim_head=8",
    "model.nsa.compress_block=8", "model.nsa.compress_stride=4", "model.nsa.sel_block=8",
    "model.nsa.num_selected=4", "model.nsa.window=16", "model.nsa.backend=torch",
    "train.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "train.log_every=1",
    "train.eval_every=3", "train.sample_every=0", "train.save_every=1000", "train.warmup_steps=2",
    "train.device=cpu", "log.wandb_mode=disabled",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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


def untrained_val_bpb(corpus):
    """Whole-split validation bits per byte of the model train.py starts from (same seed)."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", TINY + ["data.source=file", f"data.path={corpus}"])
    torch.manual_seed(cfg.train.seed)
    val = D.load_splits(cfg.data)["val"]
    loss = train.evaluate(Transformer(cfg.model), val, cfg.train.seq_len, cfg.train.batch_size,
                          D.eval_windows(val, cfg.train.seq_len), "cpu", contextlib.nullcontext(), 0, 1)
    return bits_per_byte(loss)


def test_smoke_run_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    final = train.main(args(corpus, out, "train.max_steps=6", "train.sample_every=3", "train.sample_len=8"))
    recs = records(out)
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert sum("sample" in r for r in recs) == 2 and all(r["sample"].startswith("The ") for r in recs if "sample" in r)
    # branch gates (nsa.analysis) with every validation estimate and the final figures, not per step
    gate_keys = sorted(f"gate/{i}/{b}" for i in range(2) for b in ("cmp", "slc", "win"))
    val_recs = [r for r in recs if "val_bpb" in r]
    assert val_recs and all(sorted(k for k in r if k.startswith("gate/")) == gate_keys for r in val_recs + [final])
    assert not any(k.startswith("gate/") for r in recs if "loss" in r for k in r)
    assert {"final/val_bpb", "final/test_bpb"} <= set(final) and recs[-1] == final
    assert final["final/val_bpb"] < untrained_val_bpb(corpus) - 0.3  # it learned
    # every record carries both clocks; training time never exceeds wall time
    assert all(0 <= r["train_s"] <= r["elapsed_s"] for r in recs)
    for x in ("step", "tokens", "time"):  # what scripts/plot_runs.py reads of it
        train_pts, val_pts, final_pt = plot_runs.curves(out, x)
        assert len(train_pts) == 6 and len(val_pts) == len(val_recs) and final_pt[1:] == (
            final["final/val_bpb"], final["final/test_bpb"])
    # the whole-split evaluation shows a progress bar on stderr
    err = capsys.readouterr().err
    assert "final val" in err and "final test" in err
    # resolved config saved (headed by the run's versions), loads back to the same Config
    text = (out / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["train"]["max_steps"] == 6 and saved["data"]["path"] == str(corpus)
    assert "# git_commit: " in text and "# torch: " in text and "# gpu: None" in text
    assert load_config(out / "config.yaml") == load_config(base=saved)
    # checkpoint: the documented keys (no never-read scheduler), and the model rebuilds from it
    ck = C.load_checkpoint(out)
    assert {"model", "optimizer", "step", "rng", "data", "time", "config", "run_info", "wandb_run_id"} <= set(ck)
    assert "scheduler" not in ck
    assert ck["step"] == 6 and ck["config"] == saved and ck["run_info"]["torch"] == torch.__version__
    assert ck["time"]["train_s"] == pytest.approx(recs[-1]["train_s"])
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
    # an older checkpoint's "scheduler" entry is ignored; a log line cut off by a kill is dropped
    ck = C.load_checkpoint(tmp_path / "split")
    C.save_checkpoint(tmp_path / "split" / "ckpt.pt", {**ck, "scheduler": {"kind": "warmup_cosine", "step": 4}})
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.')
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


@pytest.mark.full  # two processes: the full tier
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


def test_temp_files_of_a_killed_save_are_removed(corpus, tmp_path):
    """SIGKILL mid-save leaves `.ckpt.pt-*.tmp`: the next save removes it, and so does a run's start."""
    stale = tmp_path / ".ckpt.pt-k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt-x.tmp").write_bytes(b"not ours")
    C.save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "config": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt-x.tmp", "ckpt.pt"]

    run = tmp_path / "run"
    run.mkdir()
    (run / ".ckpt.pt-k1ll3d.tmp").write_bytes(b"half a checkpoint")
    train.main(args(corpus, run, "train.max_steps=1", "train.save_every=1000", "train.eval_every=0"))
    assert not list(run.glob(".ckpt.pt-*.tmp"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(C.CheckpointError, match="no checkpoint.*directory without ckpt.pt"):
        C.load_checkpoint(tmp_path)
    (tmp_path / "run" / "ckpt.pt").mkdir(parents=True)
    with pytest.raises(C.CheckpointError, match="ckpt.pt is a directory"):
        C.load_checkpoint(tmp_path / "run")
    C.save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.ones(1000)}, "config": {}})
    blob = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(C.CheckpointError, match="truncated, corrupt"):
        C.load_checkpoint(tmp_path)
    (tmp_path / "noise.pt").write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(tmp_path / "noise.pt")
    msg = str(err.value)  # one line of ours, not torch's advice to load with weights_only=False
    assert "truncated, corrupt" in msg and "\n" not in msg and "weights_only" not in msg
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not an nsa checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["--config", "configs"], "config file configs is a directory"),
    (["--config", "configs/smoke.yaml", "train.max_stepz=3"], "train.max_stepz"),
    (["--config", "configs/smoke.yaml", "model.nsa.window=0"], "model.nsa.window must be positive"),
    (["--config", "configs/smoke.yaml", "model.nsa.backend=flex"], "flex attention has no CPU backward"),
    (["--config", "configs/smoke.yaml", "data.source=file", "data.path=/nonexistent/file.txt"],
     "/nonexistent/file.txt does not exist"),
    (["--config", "configs/smoke.yaml", "data.source=file", "data.path=configs"], "configs is a directory"),
    (["--resume", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    ([], "--config"),
])
def test_bad_input_gives_one_clear_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.cli(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A finished 3-step run: (its directory, {file name: bytes} of what it wrote)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train.main(args(corpus, run, "train.max_steps=3", "train.eval_every=2"))
    return run, {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def _short_corpus(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(D.synthetic_bytes(30)))  # train split 28 bytes < seq_len + 1 = 33
    return path


@pytest.mark.parametrize("case", ["short data", "resume changes model", "triton on cpu"])
def test_a_run_that_cannot_start_leaves_the_directory_alone(case, corpus, finished_run, tmp_path, capsys,
                                                            monkeypatch):
    run, before = finished_run
    if case == "short data":
        argv = args(_short_corpus(tmp_path), run, "train.max_steps=3")
        message = "too few for one window of train.seq_len + 1 = 33"
    elif case == "resume changes model":
        argv = ["--resume", str(run), "train.max_steps=5", "model.dim=64"]
        message = "model.dim (32 -> 64)"
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        argv = args(corpus, run, "train.max_steps=3", "model.nsa.backend=triton")
        message = "needs a CUDA device"
    assert train.cli(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_refuses_model_and_data_changes(corpus, finished_run, tmp_path, capsys):
    run, _ = finished_run
    for override, named in (("model.dim=128", "model.dim (32 -> 128)"),
                            ("model.nsa.window=32", "model.nsa.window (16 -> 32)"),
                            ("data.val_frac=0.1", "data.val_frac (0.05 -> 0.1)")):
        assert train.cli(["--resume", str(run), "train.max_steps=4", override]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and named in err and "train.*, log.* and data.path" in err
    # a config file for another model is refused the same way
    other = tmp_path / "other.yaml"
    other.write_text((run / "config.yaml").read_text().replace("depth: 2", "depth: 3"))
    assert train.cli(["--config", str(other), "--resume", str(run), "train.max_steps=4"]) == 2
    assert "model.depth (2 -> 3)" in capsys.readouterr().err
    # train.*, log.* and data.path (the same bytes moved) may change
    moved = tmp_path / "moved.bin"
    moved.write_bytes(corpus.read_bytes())
    resumed = tmp_path / "resumed"
    train.main(["--resume", str(run / "ckpt.pt"), f"train.out_dir={resumed}", "train.max_steps=4",
                "train.log_every=2", f"data.path={moved}", "log.run_name=again"])
    assert [s for s, _ in train_losses(resumed)] == [4]  # a new directory: the log starts at the checkpoint


def test_killed_during_final_evaluation_resumes_to_it(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_evaluate = train.evaluate

    def killed_in_final(*a, desc=None, **kw):
        if desc is not None:
            raise KeyboardInterrupt
        return real_evaluate(*a, desc=desc, **kw)

    monkeypatch.setattr(train, "evaluate", killed_in_final)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(corpus, run, "train.max_steps=3"))
    monkeypatch.undo()
    assert C.load_checkpoint(run)["step"] == 3 and not any("final/val_bpb" in r for r in records(run))
    trained = train_losses(run)
    final = train.main(["--resume", str(run)])
    assert "final/val_bpb" in final and records(run)[-1] == final
    assert train_losses(run) == trained  # no step trained again
    with pytest.raises(SystemExit, match="nothing to do"):
        train.main(["--resume", str(run)])


@pytest.fixture
def fake_clock(monkeypatch):
    """train.py's clock reads a fake time: a training forward takes 1 s, any other forward (evaluation,
    gates, sampling) 100 s and a checkpoint write 1000 s."""
    now = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    real_forward, real_save = Transformer.forward, train.save_checkpoint

    def forward(self, idx, targets=None):
        now[0] += 1.0 if torch.is_grad_enabled() else 100.0
        return real_forward(self, idx, targets)

    def save(*a, **kw):
        now[0] += 1000.0
        return real_save(*a, **kw)

    monkeypatch.setattr(Transformer, "forward", forward)
    monkeypatch.setattr(train, "save_checkpoint", save)
    return now


def test_clocks_count_training_steps_only_and_resume(corpus, tmp_path, fake_clock):
    run = tmp_path / "run"
    common = ["train.eval_every=2", "train.save_every=2", "train.sample_every=2", "train.sample_len=2"]
    train.main(args(corpus, run, "train.max_steps=4", *common))
    recs = [r for r in records(run) if "loss" in r]
    assert [r["train_s"] for r in recs] == [1.0, 2.0, 3.0, 4.0]  # no evaluation, sample or checkpoint in it
    assert all(r["tokens_per_s"] == 4 * 32 / 1.0 for r in recs)  # batch x seq_len bytes per 1 s step
    assert recs[-1]["elapsed_s"] >= 4 + 1000 + 200  # wall time also holds the step-2 checkpoint and evaluation
    saved = C.load_checkpoint(run)["time"]
    assert saved["train_s"] == 4.0
    train.main(["--resume", str(run), "train.max_steps=6"])
    later = [r for r in records(run) if "loss" in r and r["step"] > 4]
    assert [r["train_s"] for r in later] == [5.0, 6.0] and later[0]["elapsed_s"] > saved["elapsed_s"]


def test_compile_auto_is_eager_on_cpu_and_warmup_is_not_training_time(corpus, tmp_path, fake_clock, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw.get("mode")) or m)  # a no-op stand-in
    train.main(args(corpus, tmp_path / "auto", "train.max_steps=1", "train.eval_every=0"))
    assert compiled == [] and load_config(tmp_path / "auto" / "config.yaml").train.compile == "auto"
    # compile_mode=reduce-overhead (CUDA graphs) applies on CUDA only: a CPU step compiles in the default mode.
    train.main(args(corpus, tmp_path / "on", "train.max_steps=5", "train.eval_every=0", "train.compile=true",
                    "train.compile_mode=reduce-overhead"))
    assert compiled == [None]
    recs = [r for r in records(tmp_path / "on") if "loss" in r]
    warm = train.COMPILE_WARMUP_STEPS
    assert [r["train_s"] for r in recs] == [0.0] * warm + [float(i) for i in range(1, 6 - warm)]
    assert not any("tokens_per_s" in r for r in recs[:warm]) and recs[warm]["tokens_per_s"] == 4 * 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_requested_on_cpu_machine(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.cli(["--config", "configs/smoke.yaml", "train.device=cuda"]) != 0
    assert "no CUDA device" in capsys.readouterr().err


def test_wandb_logging_and_resumed_run_id(corpus, tmp_path, monkeypatch):
    """wandb (faked here) gets the resolved config with the run's versions, metrics by step incl. NSA
    gates, and the same run id on resume."""
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
    info = init_kw["config"]["run_info"]
    assert info == C.load_checkpoint(out)["run_info"] and "git_commit" in info
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "loss" in c[2]] == [1, 2]
    assert "gate/1/slc" in logged[-1][2] and "final/val_bpb" in logged[-1][2]
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
