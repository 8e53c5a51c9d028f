"""scripts/bench_selection.py's CPU parts: the FLOP floor, union sizes per token, the picks files."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_selection  # noqa: E402


def test_floor_counts_the_keys_each_query_sees():
    # Every token picks block 0 of l' = 4 keys: query t sees min(t + 1, 4) of them, 1 + 2 + 3 + 4 + 4.
    idx = torch.zeros(1, 5, 1, 1, dtype=torch.int32)
    ms, flops = bench_selection.floor_ms(idx, HQ=2, D=8, sel_block=4)
    assert flops == 2 * 8 * 14 * 2 * 9  # 2 D FLOPs a key, 2 query heads, 9 GEMMs
    assert ms == flops / bench_selection.PEAK_TFLOPS / 1e9


def test_union_per_token():
    # Tokens 0-3 pick blocks {0}, tokens 4-7 {0, 1}: tiles of 4 tokens hold 1 and 2 blocks.
    idx = torch.full((1, 8, 1, 2), -1, dtype=torch.int32)
    idx[:, :, :, 0] = 0
    idx[:, 4:, :, 1] = 1
    assert bench_selection.union_per_token(idx, H=1, T=8, sel_block=4, tt=4) == (1 + 2) / 2 / 4


def test_picks_files_round_trip(tmp_path):
    picks = torch.randint(-1, 100, (5, 2, 16, 2, 4), dtype=torch.int8)
    bench_selection.save_picks(picks, tmp_path)
    files = sorted(tmp_path.glob("picks_*.pt"))
    assert [torch.load(f).shape[0] for f in files] == [bench_selection.LAYERS_PER_FILE, 1]
    assert torch.equal(torch.cat([torch.load(f) for f in files]), picks)


def test_random_picks_shared_by_runs():
    # Runs of 8 tokens share one draw: inside a run of one selection block, tokens pick the same blocks.
    import bench_kernels

    torch.manual_seed(0)
    idx = bench_kernels.random_picks(1, 64, 1, 4, 6, "cpu", chunk=32, run=8)  # 3 forced, 3 drawn
    for t0 in range(16, 64, 8):
        run = idx[0, t0:t0 + 4]  # tokens t0 .. t0 + 3: one selection block of 4, one run
        assert (run == run[:1]).all()
    assert idx[0, :, 0, 0].eq(0).all()  # block 0 is forced for every token
