"""Byte corpora, splits and batches.

Sources (`data.source`):
- `enwik8` (default): downloaded once from `ENWIK8_URL`, unzipped, checked (size + md5) and cached at
  `data/enwik8` (or `data.path`); split 90M / 5M / 5M bytes into train / val / test.
- `file`: any local file read as bytes; val and test are the last `val_frac` / `test_frac` of it
  (test last).
- `hf`: a Hugging Face text dataset (`hf_name`, `hf_config`, `hf_field`), train split, texts joined
  with newlines and UTF-8 encoded; cached as a byte file (`data.path`, or under `data/hf/`), then
  split like `file`.
- `synthetic`: a deterministic pseudo-text byte stream made in-process, so smoke runs and tests
  need neither network nor files. Split like `file`.
- `retrieval`: the long-range key-retrieval probe of nsa/retrieval.py, made in-process.

Splits are uint8 numpy arrays (memory-mapped for files). Training batches are random windows of
seq_len + 1 bytes drawn by a torch.Generator seeded from a hash of (seed, step, rank, micro), so a
batch depends on nothing but those numbers: a resumed run sees the batches it would have seen, and
each DDP rank sees its own.
"""

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

# Module constants so tests can point them at a local server and a small file.
ENWIK8_URL = "https://mattmahoney.net/dc/enwik8.zip"
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ENWIK8_SIZE = 100_000_000
DATA_DIR = Path(os.environ.get("NSA_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))
SYNTHETIC_SIZE = 400_000  # bytes of the synthetic stream
DOWNLOAD_TIMEOUT = 60  # seconds without progress before a download gives up


class DataError(RuntimeError):
    """Missing, unreachable or corrupt data; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# enwik8


def _md5(path, chunk=1 << 22):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manual_help(path):
    return (f"Download {ENWIK8_URL} by hand, unzip it and place the file `enwik8` "
            f"({ENWIK8_SIZE:,} bytes, md5 {ENWIK8_MD5}) at {path} (or point data.path at it), "
            "or train on any byte file with data.source=file data.path=PATH "
            "(data.source=synthetic needs no data at all).")


def verify_enwik8(path):
    """Raise DataError unless `path` has enwik8's size and md5."""
    path = Path(path)
    size = path.stat().st_size
    if size != ENWIK8_SIZE:
        raise DataError(f"{path} has {size:,} bytes, expected {ENWIK8_SIZE:,}: the file is truncated or not "
                        f"enwik8. Delete it to download it again. " + _manual_help(path))
    digest = _md5(path)
    if digest != ENWIK8_MD5:
        raise DataError(f"{path} has md5 {digest}, expected {ENWIK8_MD5}: the file is corrupt. "
                        f"Delete it to download it again. " + _manual_help(path))


def download_enwik8(path):
    """Download the zip, extract enwik8 and verify it; the file appears at `path` only if it checks out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_zip = tempfile.mkstemp(prefix=".enwik8-", suffix=".zip.part", dir=path.parent)
    fd2, tmp_out = tempfile.mkstemp(prefix=".enwik8-", suffix=".part", dir=path.parent)
    os.close(fd2)
    try:
        print(f"downloading {ENWIK8_URL} -> {path}", file=sys.stderr)
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(ENWIK8_URL, timeout=DOWNLOAD_TIMEOUT) as r:
                shutil.copyfileobj(r, f, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(f"could not download enwik8 from {ENWIK8_URL} ({e}). " + _manual_help(path)) from None
        try:
            with zipfile.ZipFile(tmp_zip) as z:
                names = z.namelist()
                member = "enwik8" if "enwik8" in names else (names[0] if len(names) == 1 else None)
                if member is None:
                    raise DataError(f"{ENWIK8_URL} holds {names}, no `enwik8` member. " + _manual_help(path))
                with z.open(member) as src, open(tmp_out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile as e:
            raise DataError(f"the download from {ENWIK8_URL} is not a valid zip ({e}). " + _manual_help(path)) from None
        size = os.path.getsize(tmp_out)
        digest = _md5(tmp_out)
        if size != ENWIK8_SIZE or digest != ENWIK8_MD5:
            raise DataError(f"downloaded enwik8 failed its check: {size:,} bytes, md5 {digest} "
                            f"(expected {ENWIK8_SIZE:,} bytes, md5 {ENWIK8_MD5}). Nothing was saved. "
                            + _manual_help(path))
        os.replace(tmp_out, path)
    finally:
        for p in (tmp_zip, tmp_out):
            if os.path.exists(p):
                os.remove(p)
    return path


def ensure_enwik8(path=None):
    """Path of a verified enwik8 file, downloading it when missing."""
    path = Path(path) if path else DATA_DIR / "enwik8"
    if path.is_dir():
        path = path / "enwik8"
    if not path.exists():
        download_enwik8(path)
    verify_enwik8(path)
    return path


# ---------------------------------------------------------------------------------------------
# other sources


def synthetic_bytes(size=None, seed=0):
    """Deterministic pseudo-English: Zipf-distributed made-up words with a preferred-successor
    structure, capitalised sentences and line breaks. Learnable, so a smoke run's loss goes down."""
    size = SYNTHETIC_SIZE if size is None else size
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    letter_p = 1.0 / np.arange(1, 27) ** 0.7
    letter_p /= letter_p.sum()
    n_words = 400
    words = [bytes(rng.choice(letters, size=int(rng.integers(1, 9)), p=letter_p)) for _ in range(n_words)]
    word_p = 1.0 / np.arange(1, n_words + 1)
    word_p /= word_p.sum()
    successors = rng.integers(0, n_words, size=(n_words, 4))
    n_draw = size // 2 + 64  # more word draws than can fit: every word takes >= 2 bytes
    follow = rng.random(n_draw) < 0.75
    succ_pick = rng.integers(0, 4, size=n_draw)
    free_pick = rng.choice(n_words, size=n_draw, p=word_p)
    lengths = rng.integers(4, 14, size=n_draw // 4)
    newline = rng.random(n_draw // 4) < 0.2
    out = bytearray()
    w = i = s = 0
    while len(out) < size:
        sentence = []
        for _ in range(lengths[s]):
            w = int(successors[w, succ_pick[i]]) if follow[i] else int(free_pick[i])
            sentence.append(words[w])
            i += 1
        sentence[0] = sentence[0].capitalize()
        out += b" ".join(sentence) + (b".\n" if newline[s] else b". ")
        s += 1
    return np.frombuffer(bytes(out[:size]), dtype=np.uint8)


def _hf_cache_path(cfg):
    if cfg.path:
        return Path(cfg.path)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{cfg.hf_name}_{cfg.hf_config}_{cfg.hf_field}")
    return DATA_DIR / "hf" / f"{safe}.bin"


def hf_bytes_file(cfg):
    """Encode a Hugging Face dataset's train split to a byte file once; return its path."""
    path = _hf_cache_path(cfg)
    if path.exists():
        return path
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hf needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split="train")
    except Exception as e:  # network, unknown name, missing config: all end the same way
        raise DataError(f"could not load Hugging Face dataset {cfg.hf_name!r} (config {cfg.hf_config!r}): "
                        f"{e}") from None
    columns = list(getattr(ds, "column_names", []) or [])
    if columns and cfg.hf_field not in columns:
        raise DataError(f"dataset {cfg.hf_name!r} has no field {cfg.hf_field!r}; its fields: {columns} "
                        "(set data.hf_field)")
    blob = "\n".join(t for t in ds[cfg.hf_field] if t).encode("utf-8")
    _atomic_write_bytes(path, blob)
    return path


def _atomic_write_bytes(path, blob):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _memmap(path):
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a directory (set data.path to a byte file)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (set data.path to a byte file)")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    return np.memmap(path, dtype=np.uint8, mode="r")


def _split_fractions(data, val_frac, test_frac):
    n = len(data)
    n_test = int(n * test_frac)
    n_val = int(n * val_frac)
    n_train = n - n_val - n_test
    return data[:n_train], data[n_train:n_train + n_val], data[n_train + n_val:]


def load_splits(cfg):
    """DataConfig -> dict of uint8 arrays {"train", "val", "test"}."""
    if cfg.source == "enwik8":
        data = _memmap(ensure_enwik8(cfg.path or None))
        n_train, n_val = ENWIK8_SIZE * 9 // 10, ENWIK8_SIZE // 20  # 90M / 5M / 5M
        train, val, test = data[:n_train], data[n_train:n_train + n_val], data[n_train + n_val:]
    elif cfg.source == "file":
        if not cfg.path:
            raise DataError("data.source=file needs data.path=PATH (any file, read as bytes)")
        train, val, test = _split_fractions(_memmap(cfg.path), cfg.val_frac, cfg.test_frac)
    elif cfg.source == "hf":
        train, val, test = _split_fractions(_memmap(hf_bytes_file(cfg)), cfg.val_frac, cfg.test_frac)
    elif cfg.source == "synthetic":
        train, val, test = _split_fractions(synthetic_bytes(), cfg.val_frac, cfg.test_frac)
    elif cfg.source == "retrieval":
        from nsa.retrieval import retrieval_splits  # here, not at the top: nsa.retrieval imports this module

        train, val, test = retrieval_splits(cfg)
    else:
        raise DataError(f"unknown data.source {cfg.source!r}")
    return {"train": train, "val": val, "test": test}


def check_splits(splits, seq_len):
    """DataError unless the splits can train and validate at `seq_len`: a training window needs
    seq_len + 1 bytes, a validation estimate at least 2 (the test split may be empty)."""
    n_train, n_val = len(splits["train"]), len(splits["val"])
    if n_train < seq_len + 1:
        raise DataError(f"the train split has {n_train:,} bytes, too few for one window of train.seq_len + 1 = "
                        f"{seq_len + 1:,}: use more data or a smaller train.seq_len")
    if n_val < 2:
        raise DataError(f"the val split has {n_val} bytes, too few to validate on: raise data.val_frac or use "
                        "more data")


# ---------------------------------------------------------------------------------------------
# batches


def batch_seed(seed, step, rank=0, micro=0):
    """A 63-bit seed that depends only on (seed, step, rank, micro)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _to_device(arr, device):
    t = torch.from_numpy(np.array(arr, dtype=np.int64))
    if device is not None and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if device is not None else t


def get_batch(data, batch_size, seq_len, *, seed, step, rank=0, micro=0, device=None):
    """Random windows of seq_len + 1 bytes -> (x, y) long tensors [batch_size, seq_len]."""
    n = len(data)
    if n < seq_len + 1:
        raise DataError(f"a split of {n:,} bytes is too small for windows of seq_len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(batch_seed(seed, step, rank, micro))
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=g).tolist()
    windows = np.stack([np.asarray(data[s:s + seq_len + 1]) for s in starts])
    return _to_device(windows[:, :-1], device), _to_device(windows[:, 1:], device)


def first_windows(data, batch_size, seq_len):
    """The split's first batch_size consecutive windows of seq_len + 1 bytes -> int64 [batch_size,
    seq_len + 1]: a fixed batch of real text, for benchmarks and profiles of a trained model."""
    need = batch_size * (seq_len + 1)
    if len(data) < need:
        raise DataError(f"a split of {len(data):,} bytes is shorter than {batch_size} windows of "
                        f"{seq_len + 1} bytes")
    return torch.from_numpy(np.asarray(data[:need]).astype(np.int64)).view(batch_size, seq_len + 1)


def eval_windows(data, seq_len, max_windows=None):
    """Start offsets of non-overlapping windows covering the split: every byte but the first is
    predicted exactly once (the last window may be shorter). `max_windows` keeps only the first ones
    (the fixed validation slice)."""
    n = len(data)
    starts = list(range(0, max(n - 1, 0), seq_len))
    return starts if max_windows is None else starts[:max_windows]


def num_eval_batches(data, seq_len, batch_size, starts):
    """How many batches `iter_eval_batches` yields for these arguments."""
    n = len(data)
    full = sum(s + seq_len + 1 <= n for s in starts)
    short = sum(s + seq_len + 1 > n and n - s >= 2 for s in starts)
    return -(-full // batch_size) + short


def iter_eval_batches(data, seq_len, batch_size, starts, device=None):
    """(x, y) batches of the windows at `starts`; windows of unequal length go in separate batches."""
    n = len(data)
    full = [s for s in starts if s + seq_len + 1 <= n]
    short = [s for s in starts if s + seq_len + 1 > n]
    for i in range(0, len(full), batch_size):
        w = np.stack([np.asarray(data[s:s + seq_len + 1]) for s in full[i:i + batch_size]])
        yield _to_device(w[:, :-1], device), _to_device(w[:, 1:], device)
    for s in short:
        w = np.asarray(data[s:n])[None]
        if w.shape[1] >= 2:
            yield _to_device(w[:, :-1], device), _to_device(w[:, 1:], device)
