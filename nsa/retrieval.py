"""The long-range retrieval probe: random keys stated once and asked for thousands of bytes later.

An episode is a little filler, the statement `<key=DDDDDDDD>`, more filler, then the query
`<ask=DDDDDDDD>`, where DDDDDDDD are KEY_LEN random digits. The distance from the statement's first
key byte to the query's is drawn log-uniformly from [min_distance, max_distance]: many short
distances, so that copying is learned early, and long ones that no sliding window reaches. The filler
is nsa.data's synthetic pseudo-text, in which digits, `<`, `=` and `>` never occur, so the only way to
predict a query's key is to find its statement.

`data.source: retrieval` trains with plain language modelling on a stream of episodes back to back
(a query always refers to the latest statement). scripts/eval_retrieval.py scores only the query's
key bytes, on probe windows from `probe_windows` that hold one statement and one query.

Splits: the filler of train / val / test comes from disjoint regions of one synthetic stream and the
keys from a generator per split, so every split is a deterministic function of (sizes, seed).
"""

import math

import numpy as np
import torch

from nsa.data import DataError, _split_fractions, synthetic_bytes

KEY_LEN = 8
STATE, ASK, CLOSE = b"<key=", b"<ask=", b">"
STATEMENT_LEN = len(STATE) + KEY_LEN + len(CLOSE)  # the shortest distance: the query right after
MAX_LEAD = 64  # filler bytes before each statement, drawn from [0, MAX_LEAD)
RETRIEVAL_SIZE = 32_000_000  # bytes of the three splits together
FILLER_SIZE = 2_000_000  # bytes of the synthetic stream the filler is cut from
SPLITS = ("train", "val", "test")

_DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


def _array(blob):
    return np.frombuffer(blob, dtype=np.uint8)


def filler_pools(val_frac, test_frac, seed=0, size=None):
    """The filler of each split: disjoint regions of one synthetic stream (FILLER_SIZE bytes by
    default), split like data.source=file."""
    stream = synthetic_bytes(FILLER_SIZE if size is None else size, seed)
    return dict(zip(SPLITS, _split_fractions(stream, val_frac, test_frac)))


def _filler(rng, pool, n):
    if n > len(pool):
        raise DataError(f"a filler of {n:,} bytes does not fit in a pool of {len(pool):,}: lower the distances "
                        "or raise the split's size")
    start = int(rng.integers(0, len(pool) - n + 1))
    return pool[start:start + n]


def _key(rng):
    return _DIGITS[rng.integers(0, len(_DIGITS), KEY_LEN)]


def _pair(rng, pool, distance):
    """Statement, filler and query with the query's key `distance` bytes after the statement's."""
    key = _key(rng)
    return [_array(STATE), key, _array(CLOSE), _filler(rng, pool, distance - STATEMENT_LEN), _array(ASK), key,
            _array(CLOSE)]


def _check_distances(min_distance, max_distance):
    if not STATEMENT_LEN <= min_distance <= max_distance:
        raise DataError(f"retrieval distances must satisfy {STATEMENT_LEN} <= min_distance <= max_distance "
                        f"(the statement is {STATEMENT_LEN} bytes), got {min_distance} and {max_distance}")


def retrieval_stream(size, pool, min_distance, max_distance, rng):
    """`size` bytes of episodes back to back (the last one cut off), uint8."""
    _check_distances(min_distance, max_distance)
    lo, hi = math.log(min_distance), math.log(max_distance + 1)
    parts, n = [], 0
    while n < size:
        distance = min(max_distance, int(math.exp(rng.uniform(lo, hi))))
        episode = [_filler(rng, pool, int(rng.integers(0, MAX_LEAD)))] + _pair(rng, pool, distance)
        parts += episode
        n += sum(len(p) for p in episode)
    return np.concatenate(parts)[:size]


def retrieval_splits(cfg, size=None, seed=0):
    """DataConfig (source retrieval) -> (train, val, test) uint8 arrays, `size` bytes in all
    (RETRIEVAL_SIZE by default), split by cfg.val_frac / cfg.test_frac."""
    pools = filler_pools(cfg.val_frac, cfg.test_frac, seed)
    size = RETRIEVAL_SIZE if size is None else size
    sizes = [len(s) for s in _split_fractions(np.empty(size, dtype=np.uint8), cfg.val_frac, cfg.test_frac)]
    return tuple(retrieval_stream(n, pools[name], cfg.retrieval_min_distance, cfg.retrieval_max_distance,
                                  np.random.default_rng([seed, i]))
                 for i, (name, n) in enumerate(zip(SPLITS, sizes)))


def max_probe_distance(seq_len):
    """The longest distance a probe window of seq_len bytes can hold (its statement at the very start)."""
    return seq_len + 1 - len(ASK) - KEY_LEN - len(CLOSE)


def probe_windows(pool, seq_len, distances, rng):
    """One probe per distance: (x, y) int64 [N, seq_len] as from nsa.data.get_batch, each window of
    seq_len + 1 bytes filler, one statement and, at its very end, the query whose key lies `distance`
    bytes after the statement's. The query's key bytes are y[:, key_slice(seq_len)]."""
    longest = max_probe_distance(seq_len)
    windows = []
    for d in distances:
        if not STATEMENT_LEN <= d <= longest:
            raise DataError(f"probe distance {d} is outside [{STATEMENT_LEN}, {longest}] for windows of "
                            f"{seq_len} bytes")
        pair = _pair(rng, pool, int(d))
        lead = seq_len + 1 - sum(len(p) for p in pair)
        windows.append(np.concatenate([_filler(rng, pool, lead)] + pair))
    w = torch.from_numpy(np.stack(windows).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def key_slice(seq_len):
    """Where the query's key bytes sit in a probe window's targets y."""
    end = seq_len - len(CLOSE)
    return slice(end - KEY_LEN, end)


def score_keys(logits, y):
    """Greedy scores of the query keys: (exact [N] bool, per-byte accuracy [N] float) from logits
    [N, seq_len, vocab] and targets y [N, seq_len] of a probe batch. Scored on teacher-forced argmaxes:
    every key byte is right given the right bytes before it exactly when greedy decoding reproduces the
    whole key, so `exact` is the greedy exact match; the per-byte figure is teacher-forced."""
    ks = key_slice(y.shape[1])
    hit = logits[:, ks].argmax(-1) == y[:, ks]
    return hit.all(-1), hit.float().mean(-1)
