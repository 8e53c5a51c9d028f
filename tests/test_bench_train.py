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
