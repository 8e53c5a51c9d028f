"""scripts/plot_runs.py on fake run directories: the three x axes, the final figures in the legend,
a log line cut off by a kill, clear errors."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import plot_runs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(path, records, tail=""):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def run_records(speed):
    """Four logged steps of 100 bytes each taking `speed` training seconds, a validation estimate at
    step 2 (after 5 s of evaluation), the final whole-split figures."""
    recs = []
    for step in (1, 2, 3, 4):
        recs.append({"step": step, "bpb": 8.0 - step, "tokens": 100 * step, "train_s": speed * step,
                     "elapsed_s": speed * step + (5 if step > 2 else 0)})
        if step == 2:
            recs.append({"step": 2, "val_bpb": 6.5, "train_s": speed * 2, "elapsed_s": speed * 2 + 5})
    recs.append({"step": 4, "final/val_bpb": 4.125, "final/test_bpb": 4.25, "tokens": 400, "train_s": speed * 4,
                 "elapsed_s": speed * 4 + 9})
    return recs


@pytest.fixture
def runs(tmp_path):
    fast = fake_run(tmp_path / "fast", run_records(0.5))
    slow = fake_run(tmp_path / "slow", run_records(2.0), tail='{"step": 5, "bpb": 3.')  # a write cut off
    return fast, slow


def test_x_axes(runs):
    fast, slow = runs
    train, val, final = plot_runs.curves(fast, "step")
    assert [x for x, _ in train] == [1, 2, 3, 4] and val == [(2, 6.5)] and final == (4, 4.125, 4.25)
    train, val, final = plot_runs.curves(fast, "tokens")
    assert [x for x, _ in train] == [100, 200, 300, 400] and val == [(200, 6.5)] and final[0] == 400
    train, val, final = plot_runs.curves(slow, "time")  # training seconds, not wall time
    assert [x for x, _ in train] == [2.0, 4.0, 6.0, 8.0] and val == [(4.0, 6.5)] and final[0] == 8.0


def test_tokens_without_the_field_come_from_step_times_bytes_per_step(tmp_path):
    recs = [{"step": 2, "bpb": 7.0, "tokens": 64}, {"step": 4, "val_bpb": 6.0}, {"step": 4, "final/val_bpb": 5.0}]
    train, val, final = plot_runs.curves(fake_run(tmp_path / "r", recs), "tokens")
    assert train == [(64, 7.0)] and val == [(128, 6.0)] and final == (128, 5.0, None)


@pytest.mark.parametrize("x", ["step", "tokens", "time"])
def test_one_png_with_final_figures_in_the_legend(runs, tmp_path, x, capsys):
    out = tmp_path / "plots" / f"{x}.png"
    labels = plot_runs.main([str(r) for r in runs] + ["--out", str(out), "--x", x])
    assert out.read_bytes()[:8] == PNG
    finals = [label for label in labels if "final" in label]
    assert finals == ["fast final: val 4.125 / test 4.250 (whole split)",
                      "slow final: val 4.125 / test 4.250 (whole split)"]
    assert "skipped 1 unreadable line" in capsys.readouterr().err


def test_clear_errors(tmp_path):
    out = str(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot_runs.main([str(tmp_path / "nothing"), "--out", out])
    old = fake_run(tmp_path / "old", [{"step": 1, "bpb": 7.0, "tokens": 10}])
    with pytest.raises(SystemExit, match="no \"train_s\".*--x step"):
        plot_runs.main([str(old), "--out", out, "--x", "time"])
