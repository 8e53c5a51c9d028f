"""scripts/bench_train.py's CPU part: repeated measurements summarised per model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_train  # noqa: E402


def row(name, tps=None, peak=1.0, error=None):
    r = {"name": name, "T": 8192, "batch": 8, "mode": "default"}
    return {**r, "error": error} if error else {**r, "tokens_per_s": tps, "peak_gib": peak}


def test_summary_is_the_median_range_and_largest_peak_per_model():
    rows = [row("nsa", 900.0, 11.4), row("dense", 1000.0), row("nsa", 800.0, 11.5), row("dense", 1010.0),
            row("nsa", 850.0, 11.4), row("dense", error="OutOfMemoryError")]
    nsa, dense = bench_train.summarize(rows)
    assert (nsa["name"], nsa["tokens_per_s"], nsa["range"], nsa["peak_gib"], nsa["measurements"]) == \
        ("nsa", 850.0, "800-900", 11.5, 3)
    assert (dense["tokens_per_s"], dense["range"], dense["measurements"]) == (1005.0, "1,000-1,010", 2)


def test_one_measurement_has_no_range_and_all_failed_keeps_the_error():
    one, failed = bench_train.summarize([row("nsa", 900.0), row("dense", error="OutOfMemoryError: x")])
    assert one["range"] == "" and one["tokens_per_s"] == 900.0
    assert failed["error"] == "OutOfMemoryError: x"


def test_a_checkpoint_source_is_its_weights_and_its_training_bytes(tmp_path):
    import pytest
    import torch

    from nsa.checkpoint import save_checkpoint
    from nsa.config import load_config, to_dict
    from nsa.data import first_windows
    from nsa.model import Transformer

    cfg = load_config(overrides=["model.dim=32", "model.depth=1", "model.heads=2", "model.kv_heads=1",
                                 "model.dim_head=16", "model.attention=dense", "data.source=synthetic"])
    model = Transformer(cfg.model)
    path = save_checkpoint(tmp_path / "run" / "ckpt.pt", {"model": model.state_dict(), "config": to_dict(cfg)})
    src = bench_train.Source(None, str(path.parent))
    built = src.build()
    assert built.training and all(torch.equal(a, b) for a, b in zip(built.state_dict().values(),
                                                                      model.state_dict().values()))
    x = first_windows(src.data, 3, 10)
    assert x.shape == (3, 11) and x.dtype == torch.int64
    assert x.flatten().tolist() == src.data[:33].tolist()  # consecutive windows from the split's start
    assert "its training bytes" in src.describe()
    with pytest.raises(SystemExit, match="is a model.attention=dense model, not nsa"):
        bench_train.Source(None, str(path.parent), "nsa")  # the twins swapped
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        (tmp_path / "junk.pt").write_text("junk")
        bench_train.Source(None, str(tmp_path / "junk.pt"))


def test_first_windows_refuses_a_short_split():
    import numpy as np
    import pytest

    from nsa.data import DataError, first_windows

    with pytest.raises(DataError, match="shorter than 2 windows of 9 bytes"):
        first_windows(np.zeros(17, np.uint8), 2, 8)
