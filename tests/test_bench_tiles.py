"""scripts/bench_tiles.py's CPU parts: every variant runs through the kernels and the launch tables are
left as they were (the timer is stubbed; the interpreter picks its own small tiles)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_tiles  # noqa: E402
import nsa.ops.range_attention as RA  # noqa: E402
import nsa.ops.selection as SEL  # noqa: E402
import nsa.ops.topn as TN  # noqa: E402


@pytest.fixture
def one_call(monkeypatch):
    monkeypatch.setattr(bench_tiles, "median_ms", lambda fn: (fn(), 0.0)[1])


def _production():
    """Every launch table and option the sweep patches, copied."""
    return (dict(RA.FWD_TILES), dict(RA.FWD_TILES_BANDED), dict(RA.DQ_TILES), dict(RA.DKDV_TILES),
            dict(RA.DKDV_TILES_BANDED), RA.SPLIT_PROGRAMS_PER_SM, SEL.WALK_LAUNCHES, dict(SEL.DKV_LAUNCHES),
            SEL.KEYS_MAJOR_MAX_D, TN._tiles)


@pytest.mark.full  # 40 s of interpreted launches
def test_every_variant_runs_and_production_is_restored(one_call):
    torch.manual_seed(0)
    B, T, HQ, H, D = 1, 70, 4, 2, 16
    q, do = torch.randn(B, T, HQ, D), torch.randn(B, T, HQ, D)
    k, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    ck, cv = torch.randn(B, 4, H, D), torch.randn(B, 4, H, D)
    before = _production()
    rows = [*bench_tiles.range_rows(q, do, (ck, cv), D**-0.5, "compressed", bench_tiles.COMPRESSED_RULE),
            *bench_tiles.range_rows(q, do, (k, v), D**-0.5, "window", bench_tiles.window_rule(8)),
            *bench_tiles.selection_rows(q, k, v, do, D**-0.5, 2, sel_block=16, n=2),
            *bench_tiles.topn_rows(q, ck, cv, D**-0.5), *bench_tiles.dense_rows(q, k, v, do)]
    assert _production() == before
    v = bench_tiles.VARIANTS
    want = (2 * (2 + len(v["range_fwd"]) + len(v["range_dq"]) + len(v["range_dkdv"])) + len(v["range_splits"])
            + 2 + 2 * (1 + len(v["sel_walk"])) + 1 + len(v["sel_dkv"]) + 1 + 1 + len(v["topn"]) + 2)
    assert len(rows) == want
    assert not any("DIFFERS" in r[1] for r in rows)
