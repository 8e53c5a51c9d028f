"""nsa.analysis, the retrieval probe (nsa/retrieval.py) and the scripts built on them
(scripts/eval_context.py, eval_retrieval.py, plot_selection.py), on tiny CPU models."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa import analysis as A  # noqa: E402
from nsa import retrieval as R  # noqa: E402
from nsa.checkpoint import save_checkpoint  # noqa: E402
from nsa.config import load_config, to_dict  # noqa: E402
from nsa.data import DataError, load_splits  # noqa: E402
from nsa.model import Transformer  # noqa: E402

TINY = ["model.dim=32", "model.depth=2", "model.heads=4", "model.kv_heads=2", "model.dim_head=8",
        "model.nsa.compress_block=8", "model.nsa.compress_stride=4", "model.nsa.sel_block=8",
        "model.nsa.num_selected=4", "model.nsa.window=16", "model.nsa.backend=torch",
        "data.source=synthetic", "train.seq_len=64", "train.batch_size=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(attention="nsa", *extra):
    cfg = load_config(overrides=TINY + [f"model.attention={attention}", *extra])
    torch.manual_seed(0)
    return Transformer(cfg.model), cfg


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Run directories of a tiny NSA model and its dense twin, written as train.py writes them."""
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for attention in ("nsa", "dense"):
        model, cfg = tiny(attention)
        paths[attention] = save_checkpoint(root / attention / "ckpt.pt",
                                           {"model": model.state_dict(), "config": to_dict(cfg)}).parent
    (root / "junk.pt").write_text("not a checkpoint")
    paths["junk"] = root / "junk.pt"
    return paths


@pytest.fixture
def small_retrieval(monkeypatch):
    """Retrieval splits of 60 kB from 40 kB of filler, so data.source=retrieval is quick here."""
    monkeypatch.setattr(R, "RETRIEVAL_SIZE", 60_000)
    monkeypatch.setattr(R, "FILLER_SIZE", 40_000)


# --- nsa.analysis ----------------------------------------------------------------------------------


def test_branch_gates_open_at_half_and_follow_each_layers_gate_layer():
    model, _ = tiny()
    x = torch.randint(0, 256, (2, 40))
    gates = A.branch_gates(model, x)
    assert gates.shape == (2, 3) and torch.equal(gates, torch.full((2, 3), 0.5))  # zero-init gate layer
    # Zero weights: the gate of branch b in head h is sigmoid(bias[3 h + b]) at every position.
    with torch.no_grad():
        model.blocks[1].attn.to_gates.bias.view(4, 3)[:, 1] = 2.0  # layer 1, selected branch
        model.blocks[0].attn.to_gates.bias.view(4, 3)[0, 2] = -1.0  # layer 0, window branch, head 0 only
    gates = A.branch_gates(model.train(), x)
    expected = torch.tensor([[0.5, 0.5, (0.5 * 3 + torch.sigmoid(torch.tensor(-1.0)).item()) / 4],
                             [0.5, torch.sigmoid(torch.tensor(2.0)).item(), 0.5]])
    assert torch.allclose(gates, expected)
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_branch_gates_of_a_dense_model_is_a_clear_error():
    model, _ = tiny("dense")
    with pytest.raises(ValueError, match="no NSA layers"):
        A.branch_gates(model, torch.zeros(1, 8, dtype=torch.long))


def test_unwrap_peels_ddp_and_compile_wrappers():
    model, _ = tiny()

    class Wrapper(torch.nn.Module):  # the attribute names DDP and torch.compile use
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    assert A.unwrap(Wrapper(Wrapper(model, "_orig_mod"), "module")) is model
    assert A.nsa_layers(Wrapper(model, "module")) == [0, 1]


def test_loss_by_position_is_the_per_position_cross_entropy():
    model, _ = tiny()
    x, y = torch.randint(0, 256, (2, 3, 48))
    per_pos = A.loss_by_position(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    with torch.no_grad():
        logits, loss = model(x, y)
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(3, 48).mean(0) / math.log(2)
    assert per_pos.shape == (48,) and torch.allclose(per_pos.float(), want, atol=1e-5)
    assert math.isclose(per_pos.mean().item(), loss.item() / math.log(2), rel_tol=1e-5)
    with pytest.raises(ValueError, match="one window length"):
        A.loss_by_position(model, [(x[:1], y[:1]), (x[:1, :40], y[:1, :40])])
    with pytest.raises(ValueError, match="no windows"):
        A.loss_by_position(model, [])


def test_bucket_means():
    v = torch.arange(10, dtype=torch.float64)
    assert A.bucket_means(v, 4).tolist() == [1.5, 5.5, 8.5]
    assert A.bucket_means(v, 10).tolist() == [4.5]
    with pytest.raises(ValueError):
        A.bucket_means(v, 0)


def test_selection_picks_hold_the_forced_blocks_and_no_future_block():
    model, cfg = tiny()
    T, sel = 64, cfg.model.nsa.sel_block
    picks = A.selection_picks(model, torch.randint(0, 256, (2, T)), 1)
    assert picks.shape == (2, T, 2, 4) and picks.dtype == torch.int32
    assert "select" not in vars(model.blocks[1].attn)  # the layer's own method again
    cur = (torch.arange(T) // sel)[None, :, None]
    valid = picks[picks >= 0]
    assert valid.numel() and (picks <= cur[..., None]).all()
    assert ((picks == 0).any(-1)).all() and ((picks == cur[..., None]).any(-1)).all()  # initial and own block
    # late queries have more visible blocks than picks: some block is skipped
    assert (picks[:, -1] >= 0).all() and picks[:, -1].unique().numel() < T // sel
    with pytest.raises(ValueError, match="not an NSA layer"):
        A.selection_picks(model, torch.zeros(1, 8, dtype=torch.long), 2)


def test_selection_map_counts_picks_per_query_bin():
    idx = torch.tensor([[[0, -1]], [[0, 1]], [[1, 2]], [[0, 2]]], dtype=torch.int32)  # [T=4, Hs=1, n=2]
    full = A.selection_map(idx, 3)
    assert full.shape == (1, 4, 3) and full[0].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert A.selection_map(idx, 3, rows=2)[0].tolist() == [[1, 0.5, 0], [0.5, 0.5, 1]]


# --- the retrieval probe ---------------------------------------------------------------------------


def pairs_in(stream):
    """(statement key start, query key start, statement key, query key) of every whole pair."""
    blob = bytes(stream)
    out = []
    for m in re.finditer(re.escape(R.ASK), blob):
        q = m.end()
        s = blob.rfind(R.STATE, 0, m.start())
        if s >= 0 and q + R.KEY_LEN <= len(blob):
            s += len(R.STATE)
            out.append((s, q, blob[s:s + R.KEY_LEN], blob[q:q + R.KEY_LEN]))
    return out


def test_retrieval_stream_states_each_key_once_and_asks_at_the_drawn_distance():
    pool = R.filler_pools(0.05, 0.05, size=20_000)["train"]
    stream = R.retrieval_stream(30_000, pool, 20, 900, np.random.default_rng(3))
    assert stream.dtype == np.uint8 and len(stream) == 30_000
    pairs = pairs_in(stream)
    assert len(pairs) > 20
    distances = [q - s for s, q, _, _ in pairs]
    assert all(20 <= d <= 900 for d in distances) and min(distances) < 100 < 500 < max(distances)
    for s, q, k1, k2 in pairs:
        assert k1 == k2 and k1.isdigit() and len(k1) == R.KEY_LEN
        assert bytes(stream).count(k1) == 2  # stated once, asked once
        assert not any(chr(c).isdigit() for c in bytes(stream[s + R.KEY_LEN:q - len(R.ASK)]))  # filler only


def test_retrieval_splits_are_deterministic_and_distinct(small_retrieval):
    cfg = load_config(overrides=["data.source=retrieval", "data.retrieval_max_distance=2000"]).data
    a, b = R.retrieval_splits(cfg), R.retrieval_splits(cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], R.retrieval_splits(cfg, seed=1)[1][:len(a[1])])
    assert [len(s) for s in a] == [54_000, 3_000, 3_000]
    keys = [{k for _, _, k, _ in pairs_in(s)} for s in a]
    assert all(keys) and not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    # filler comes from disjoint regions of one synthetic stream
    pools = R.filler_pools(cfg.val_frac, cfg.test_frac)
    assert sum(len(p) for p in pools.values()) == R.FILLER_SIZE
    whole = np.concatenate(list(pools.values()))
    assert np.array_equal(whole, R.synthetic_bytes(R.FILLER_SIZE, 0))
    val = bytes(a[1])
    chunk = val[val.index(b">") + 1:][:40]  # filler after the first statement
    assert bytes(pools["val"]).find(chunk) >= 0 and bytes(pools["train"]).find(chunk) < 0
    # and through nsa.data
    splits = load_splits(cfg)
    assert np.array_equal(splits["val"], a[1])


def test_retrieval_distances_are_checked():
    pool = R.filler_pools(0.05, 0.05, size=20_000)["train"]
    with pytest.raises(DataError, match="min_distance"):
        R.retrieval_stream(1000, pool, 5, 100, np.random.default_rng(0))
    with pytest.raises(DataError, match="does not fit"):
        R.retrieval_stream(100_000, pool, 50, 30_000, np.random.default_rng(0))
    with pytest.raises(Exception, match="retrieval_min_distance"):
        load_config(overrides=["data.retrieval_min_distance=500", "data.retrieval_max_distance=100"])


def test_probe_windows_put_the_key_at_the_stated_distance():
    pool = R.filler_pools(0.05, 0.05, size=20_000)["val"]
    seq_len = 200
    longest = R.max_probe_distance(seq_len)
    distances = [R.STATEMENT_LEN, 50, 137, longest]
    x, y = R.probe_windows(pool, seq_len, distances, np.random.default_rng(0))
    assert x.shape == y.shape == (4, seq_len) and torch.equal(x[:, 1:], y[:, :-1])
    ks = R.key_slice(seq_len)
    for row_x, row_y, d in zip(x, y, distances):
        window = bytes(row_x.tolist()) + bytes([row_y[-1].item()])
        assert window.endswith(R.CLOSE) and window.count(R.STATE) == 1 and window.count(R.ASK) == 1
        s = window.index(R.STATE) + len(R.STATE)
        q = window.index(R.ASK) + len(R.ASK)
        assert q - s == d and window[s:s + R.KEY_LEN] == bytes(row_y[ks].tolist())
    assert window.startswith(R.STATE)  # the longest distance starts the window with the statement
    with pytest.raises(DataError, match="outside"):
        R.probe_windows(pool, seq_len, [longest + 1], np.random.default_rng(0))


def test_score_keys_on_constructed_logits():
    pool = R.filler_pools(0.05, 0.05, size=20_000)["val"]
    _, y = R.probe_windows(pool, 100, [30, 60, 80], np.random.default_rng(0))
    oracle = F.one_hot(y, 256).float()
    exact, per_byte = R.score_keys(oracle, y)
    assert exact.tolist() == [True] * 3 and per_byte.tolist() == [1.0] * 3
    ks = R.key_slice(100)
    wrong = oracle.clone()
    wrong[0, ks.start + 3] = wrong[0, ks.start + 3].roll(1)  # one key byte wrong in window 0
    wrong[1, :ks.start] = 0  # nothing right before the key: does not count
    wrong[2, ks.stop] = wrong[2, ks.stop].roll(1)  # the closing `>` wrong: does not count
    exact, per_byte = R.score_keys(wrong, y)
    assert exact.tolist() == [False, True, True] and per_byte.tolist() == [7 / 8, 1.0, 1.0]


# --- the scripts -----------------------------------------------------------------------------------


def test_eval_context_end_to_end(checkpoints, tmp_path, capsys):
    out = tmp_path / "ctx.png"
    script("eval_context").main([str(checkpoints["nsa"]), str(checkpoints["dense"] / "ckpt.pt"), "--out", str(out),
                                 "--buckets", "16", "--batches", "1"])
    assert out.stat().st_size > 1000
    lines = capsys.readouterr().out.splitlines()
    assert "nsa (nsa)" in lines[0] and "dense (dense)" in lines[0]
    rows = [line.split() for line in lines[1:5]]
    assert [r[0] for r in rows] == ["0-15", "16-31", "32-47", "48-63"]
    assert all(5 < float(v) < 10 for r in rows for v in r[1:])  # ~8 bits: untrained models
    assert lines[5].startswith("mean")


def test_eval_retrieval_end_to_end(checkpoints, tmp_path, capsys):
    out = tmp_path / "ret.png"
    script("eval_retrieval").main([str(checkpoints["nsa"]), str(checkpoints["dense"]), "--buckets", "3",
                                   "--per-bucket", "2", "--out", str(out)])
    assert out.stat().st_size > 1000
    lines = capsys.readouterr().out.splitlines()
    longest = R.max_probe_distance(64)
    assert lines[2].startswith(f"{R.STATEMENT_LEN}-") and lines[4].split()[0].endswith(f"-{longest}")
    assert len(lines) == 5 and lines[2].count("/") == 2


def test_eval_retrieval_scores_an_oracle_as_perfect(checkpoints, monkeypatch):
    """probe() with a model that predicts every next byte: exact match 1.0 in every bucket."""
    mod = script("eval_retrieval")

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return self.next_bytes, None

    oracle, cfg = Oracle(), tiny()[1]
    real_windows = mod.probe_windows

    def windows_and_answers(*a):
        x, y = real_windows(*a)
        oracle.next_bytes = F.one_hot(y, 256).float()
        return x, y

    monkeypatch.setattr(mod, "model_from_checkpoint", lambda path, device: (oracle, cfg))
    monkeypatch.setattr(mod, "probe_windows", windows_and_answers)
    args = mod.parse_args([str(checkpoints["nsa"]), "--buckets", "2", "--per-bucket", "3", "--batch-size", "3"])
    _, _, edges, exact, per_byte = mod.probe(str(checkpoints["nsa"]), args, torch.device("cpu"),
                                             A.device_and_autocast("cpu")[1])
    assert len(edges) == 3 and exact == [1.0, 1.0] and per_byte == [1.0, 1.0]


def test_plot_selection_end_to_end(checkpoints, tmp_path, capsys, small_retrieval):
    out = tmp_path / "sel.png"
    script("plot_selection").main([str(checkpoints["nsa"]), "--out", str(out), "--layer", "0", "--rows", "16",
                                   "--data", "source=retrieval", "retrieval_max_distance=60"])
    assert out.stat().st_size > 1000
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "cmp", "slc", "win"] and lines[1].split() == ["0", "0.500", "0.500", "0.500"]


@pytest.mark.parametrize("name, argv, message", [
    ("eval_context", ["{missing}", "--out", "x.png"], "no checkpoint at"),
    ("eval_context", ["{junk}", "--out", "x.png"], "not a readable checkpoint"),
    ("eval_context", ["{nsa}", "--out", "x.png", "--data", "source=file"], "data.path"),
    ("eval_context", ["{nsa}", "--out", "x.png", "--data", "nope=1"], "unknown config key"),
    ("eval_retrieval", ["{missing}"], "no checkpoint at"),
    ("eval_retrieval", ["{nsa}", "--max-distance", "500"], "does not fit windows of 64 bytes"),
    ("eval_retrieval", ["{nsa}", "--buckets", "100"], "do not fit"),
    ("plot_selection", ["{dense}", "--out", "x.png"], "dense model"),
    ("plot_selection", ["{junk}", "--out", "x.png"], "not a readable checkpoint"),
    ("plot_selection", ["{nsa}", "--out", "x.png", "--layer", "7"], "not an NSA layer"),
    ("plot_selection", ["{nsa}", "--out", "x.png", "--window", "100000"], "past the end"),
])
def test_bad_input_is_a_one_line_error(checkpoints, tmp_path, name, argv, message):
    paths = {k: str(v) for k, v in checkpoints.items()} | {"missing": str(tmp_path / "nowhere")}
    with pytest.raises(SystemExit) as e:
        script(name).main([a.format(**paths) for a in argv])
    text = str(e.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


@pytest.mark.parametrize("name, argv", [
    ("eval_context", ["{nsa}", "--out", "x.png", "--buckets", "0"]),
    ("eval_retrieval", ["{nsa}", "--per-bucket", "0"]),
    ("plot_selection", ["{nsa}", "--out", "x.png", "--rows", "0"]),
    ("plot_selection", ["{nsa}"]),
])
def test_bad_arguments_are_usage_errors(checkpoints, capsys, name, argv):
    with pytest.raises(SystemExit) as e:
        script(name).main([a.format(**{k: str(v) for k, v in checkpoints.items()}) for a in argv])
    assert e.value.code == 2 and ": error: " in capsys.readouterr().err.strip().splitlines()[-1]
