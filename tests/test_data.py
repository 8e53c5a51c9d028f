"""Data: enwik8 download + checks (against a local HTTP server), file / hf / synthetic sources,
reproducible batches, evaluation windows. Everything here makes its own files."""

import hashlib
import http.server
import io
import socket
import sys
import threading
import types
import zipfile

import numpy as np
import pytest
import torch

from nsa import data as D
from nsa.config import DataConfig


# --------------------------------------------------------------------------------------------- enwik8

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, size=20_000, dtype=np.uint8))


def make_zip(payload, member="enwik8"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, payload)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to the local server must not go through a proxy the environment may name."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    """A local HTTP server; set `server.body` to what it serves. Yields its base URL holder."""
    state = types.SimpleNamespace(body=b"", hits=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.hits += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/enwik8.zip"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def small_enwik8(monkeypatch, tmp_path, server):
    """Point the module at the local server and a 20 kB stand-in for enwik8."""
    monkeypatch.setattr(D, "ENWIK8_URL", server.url)
    monkeypatch.setattr(D, "ENWIK8_MD5", hashlib.md5(PAYLOAD).hexdigest())
    monkeypatch.setattr(D, "ENWIK8_SIZE", len(PAYLOAD))
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "data")
    server.body = make_zip(PAYLOAD)
    return server


def test_download_verify_cache_and_split(small_enwik8, tmp_path):
    splits = D.load_splits(DataConfig(source="enwik8"))
    target = tmp_path / "data" / "enwik8"
    assert target.read_bytes() == PAYLOAD
    assert [len(splits[k]) for k in ("train", "val", "test")] == [18_000, 1_000, 1_000]  # 90% / 5% / 5%
    assert bytes(splits["train"]) + bytes(splits["val"]) + bytes(splits["test"]) == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["enwik8"]  # no temp files left
    # cached: no second download
    D.load_splits(DataConfig(source="enwik8"))
    assert small_enwik8.hits == 1


def test_data_path_overrides_location(small_enwik8, tmp_path):
    where = tmp_path / "elsewhere" / "e8"
    D.load_splits(DataConfig(source="enwik8", path=str(where)))
    assert where.read_bytes() == PAYLOAD
    assert not (tmp_path / "data" / "enwik8").exists()


def test_bad_checksum_raises_and_leaves_nothing(small_enwik8, monkeypatch, tmp_path):
    monkeypatch.setattr(D, "ENWIK8_MD5", "0" * 32)
    with pytest.raises(D.DataError, match="failed its check"):
        D.load_splits(DataConfig(source="enwik8"))
    folder = tmp_path / "data"
    assert not (folder / "enwik8").exists()
    assert list(folder.iterdir()) == []  # temp files cleaned up
    # with the right checksum the next attempt downloads and passes; nothing stale was reused
    monkeypatch.setattr(D, "ENWIK8_MD5", hashlib.md5(PAYLOAD).hexdigest())
    D.load_splits(DataConfig(source="enwik8"))
    assert small_enwik8.hits == 2


def test_truncated_download_is_rejected(small_enwik8, tmp_path):
    small_enwik8.body = make_zip(PAYLOAD[:-100])
    with pytest.raises(D.DataError, match="failed its check"):
        D.ensure_enwik8()
    assert not (tmp_path / "data" / "enwik8").exists()


def test_not_a_zip_is_rejected(small_enwik8, tmp_path):
    small_enwik8.body = b"<html>not found</html>"
    with pytest.raises(D.DataError, match="not a valid zip"):
        D.ensure_enwik8()
    assert list((tmp_path / "data").iterdir()) == []


def test_corrupt_or_truncated_local_file_is_never_used(small_enwik8, tmp_path):
    target = tmp_path / "data" / "enwik8"
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD[:-1])
    with pytest.raises(D.DataError, match="truncated"):
        D.load_splits(DataConfig(source="enwik8"))
    target.write_bytes(bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:])
    with pytest.raises(D.DataError, match="corrupt"):
        D.load_splits(DataConfig(source="enwik8"))
    assert small_enwik8.hits == 0  # a bad file is reported, not silently replaced


def test_no_network_error_says_what_to_do(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(D, "ENWIK8_URL", f"http://127.0.0.1:{port}/enwik8.zip")
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "data")
    with pytest.raises(D.DataError) as err:
        D.load_splits(DataConfig(source="enwik8"))
    msg = str(err.value)
    assert "could not download" in msg and "by hand" in msg and "data.path" in msg and "data.source=file" in msg
    assert list((tmp_path / "data").iterdir()) == []


# --------------------------------------------------------------------------------------------- other sources

def test_file_source_splits_from_the_end(tmp_path):
    blob = bytes(range(256)) * 40  # 10,240 bytes
    path = tmp_path / "corpus.bin"
    path.write_bytes(blob)
    s = D.load_splits(DataConfig(source="file", path=str(path), val_frac=0.1, test_frac=0.05))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (10240 - 1024 - 512, 1024, 512)
    assert bytes(s["test"]) == blob[-512:]
    assert bytes(s["val"]) == blob[-1536:-512]
    assert s["train"].dtype == np.uint8


def test_file_source_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_splits(DataConfig(source="file", path=str(tmp_path / "missing.txt")))
    with pytest.raises(D.DataError, match="data.path"):
        D.load_splits(DataConfig(source="file"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(D.DataError, match="empty"):
        D.load_splits(DataConfig(source="file", path=str(tmp_path / "empty")))
    with pytest.raises(D.DataError, match=f"data file {tmp_path} is a directory"):
        D.load_splits(DataConfig(source="file", path=str(tmp_path)))


def test_splits_too_short_for_seq_len_are_refused():
    data = np.zeros(100, dtype=np.uint8)
    D.check_splits({"train": data[:33], "val": data[:2], "test": data[:0]}, seq_len=32)  # just enough
    with pytest.raises(D.DataError, match=r"train split has 32 bytes.*train\.seq_len \+ 1 = 33"):
        D.check_splits({"train": data[:32], "val": data[:10], "test": data[:10]}, seq_len=32)
    with pytest.raises(D.DataError, match=r"val split has 1 bytes.*data\.val_frac"):
        D.check_splits({"train": data, "val": data[:1], "test": data[:10]}, seq_len=32)


def test_synthetic_is_deterministic_text():
    a, b = D.synthetic_bytes(), D.synthetic_bytes()
    assert len(a) == D.SYNTHETIC_SIZE and np.array_equal(a, b)
    text = bytes(a[:2000]).decode("ascii")
    assert ". " in text and text[0].isupper()
    assert len(np.unique(a)) < 64  # text-like, not noise
    s = D.load_splits(DataConfig(source="synthetic"))
    assert sum(len(v) for v in s.values()) == D.SYNTHETIC_SIZE


def test_hf_source_joins_encodes_and_caches(monkeypatch, tmp_path):
    calls = []

    class FakeDataset(dict):
        column_names = ["text", "id"]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return FakeDataset(text=["héllo", "", "wörld"] * 50, id=list(range(150)))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "data")
    cfg = DataConfig(source="hf", hf_name="someone/tiny", hf_config="v1", val_frac=0.1, test_frac=0.1)
    s = D.load_splits(cfg)
    blob = "\n".join(["héllo", "wörld"] * 50).encode("utf-8")
    assert bytes(s["train"]) + bytes(s["val"]) + bytes(s["test"]) == blob
    assert calls == [("someone/tiny", "v1", "train")]
    D.load_splits(cfg)  # cached byte file: the dataset is not loaded again
    assert len(calls) == 1
    with pytest.raises(D.DataError, match="no field 'body'"):
        D.load_splits(DataConfig(source="hf", hf_name="someone/tiny", hf_field="body"))


def test_hf_source_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "data")
    with pytest.raises(D.DataError, match="pip install datasets"):
        D.load_splits(DataConfig(source="hf", hf_name="x"))


# --------------------------------------------------------------------------------------------- batches

def test_batches_reproducible_and_distinct():
    data = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    kw = dict(seed=3, step=5, rank=0, micro=0)
    x1, y1 = D.get_batch(data, 4, 32, **kw)
    x2, y2 = D.get_batch(data, 4, 32, **kw)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 32) and x1.dtype == torch.long
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one byte
    assert torch.equal((x1[:, 1:] - x1[:, :-1]) % 256, torch.ones(4, 31, dtype=torch.long))  # contiguous windows
    for change in ({"seed": 4}, {"step": 6}, {"rank": 1}, {"micro": 1}):
        x3, _ = D.get_batch(data, 4, 32, **{**kw, **change})
        assert not torch.equal(x1, x3), change
    # independent of global RNG state
    torch.manual_seed(123)
    assert torch.equal(D.get_batch(data, 4, 32, **kw)[0], x1)


def test_batch_windows_cover_the_whole_split():
    data = np.arange(40, dtype=np.uint8)
    seen = set()
    for step in range(300):
        x, y = D.get_batch(data, 2, 8, seed=0, step=step)
        seen.update(x[:, 0].tolist())
        assert int(y.max()) <= 39
    assert seen == set(range(40 - 8))  # every valid start, including the last one
    with pytest.raises(D.DataError, match="too small"):
        D.get_batch(data[:8], 1, 8, seed=0, step=0)


def test_eval_windows_predict_every_byte_once():
    data = np.frombuffer(bytes(range(103)), dtype=np.uint8)
    starts = D.eval_windows(data, 10)
    targets = []
    for x, y in D.iter_eval_batches(data, 10, 4, starts):
        assert x.shape == y.shape and x.shape[1] <= 10
        targets += y.flatten().tolist()
    assert sorted(targets) == list(range(1, 103))
    assert D.eval_windows(data, 10, max_windows=3) == [0, 10, 20]


@pytest.mark.parametrize("n, seq_len, batch_size", [(103, 10, 4), (101, 10, 4), (102, 10, 3), (5, 10, 2), (2, 10, 1)])
def test_num_eval_batches_counts_what_iter_eval_batches_yields(n, seq_len, batch_size):
    data = np.zeros(n, dtype=np.uint8)
    starts = D.eval_windows(data, seq_len)
    for some in (starts, starts[::2]):
        assert D.num_eval_batches(data, seq_len, batch_size, some) == len(
            list(D.iter_eval_batches(data, seq_len, batch_size, some)))
