"""Long-range retrieval accuracy against the distance between a key's statement and its query.

    python scripts/eval_retrieval.py runs/retrieval_nsa runs/retrieval_dense [--buckets 8] [--per-bucket 64]
        [--out retrieval.png]

Probe windows (nsa/retrieval.py) of the checkpoint's train.seq_len bytes hold filler, one statement
`<key=DDDDDDDD>` and, at the very end, the query `<ask=DDDDDDDD>`. Distances (from the statement's
first key byte to the query's) are drawn uniformly within --buckets equal-width buckets spanning
[--min-distance, --max-distance] (default: all that fit the window), --per-bucket windows each. Per
bucket: exact match (all key bytes right, as greedy decoding would give) and per-byte accuracy
(teacher-forced; chance is 0.1). The windows depend only on --seed, --split, the window length and
the distances, so checkpoints of one window length see the same probes. Any byte-level checkpoint
can be probed; those trained with data.source=retrieval have learned the task. Prints a table,
writes a PNG with --out.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa.analysis import device_and_autocast, pyplot, run_label  # noqa: E402
from nsa.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from nsa.config import ConfigError  # noqa: E402
from nsa.data import DataError  # noqa: E402
from nsa.ops import BackendError  # noqa: E402
from nsa.retrieval import STATEMENT_LEN, filler_pools, max_probe_distance, probe_windows, score_keys  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint files or run directories")
    p.add_argument("--buckets", type=int, default=8, help="distance buckets")
    p.add_argument("--per-bucket", type=int, default=64, help="probe windows per bucket")
    p.add_argument("--min-distance", type=int, default=STATEMENT_LEN)
    p.add_argument("--max-distance", type=int, default=0, help="default: the longest that fits the window")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the checkpoint's train.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="val", choices=["val", "test"], help="whose filler the probes use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG file to write (optional)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["auto", "torch", "flex", "triton"],
                   help="override the checkpoints' nsa.backend")
    args = p.parse_args(argv)
    for name in ("buckets", "per_bucket", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len < 0 or args.max_distance < 0:
        p.error("--seq-len and --max-distance must be positive (0: the default)")
    return args


def bucket_edges(lo, hi, buckets):
    """Integer edges of `buckets` equal-width buckets covering [lo, hi]; bucket i is [e[i], e[i+1])."""
    if not STATEMENT_LEN <= lo <= hi:
        raise ValueError(f"distances must satisfy {STATEMENT_LEN} <= min <= max, got {lo} and {hi} "
                         "(is the window long enough?)")
    if hi - lo + 1 < buckets:
        raise ValueError(f"{buckets} buckets do not fit in the {hi - lo + 1} distances from {lo} to {hi}")
    return np.linspace(lo, hi + 1, buckets + 1).round().astype(int)


def probe(path, args, device, autocast):
    """(label, cfg, edges, exact [buckets], per-byte [buckets]) of one checkpoint."""
    model, cfg = model_from_checkpoint(path, device)
    if args.backend is not None:
        cfg.model.nsa.backend = args.backend  # the one NSAConfig every layer of the model reads
    seq_len = args.seq_len or cfg.train.seq_len
    longest = max_probe_distance(seq_len)
    if args.max_distance > longest:
        raise ValueError(f"--max-distance {args.max_distance} does not fit windows of {seq_len} bytes "
                         f"(at most {longest})")
    edges = bucket_edges(args.min_distance, args.max_distance or longest, args.buckets)
    pool = filler_pools(cfg.data.val_frac, cfg.data.test_frac)[args.split]
    rng = np.random.default_rng(args.seed)
    exact, per_byte = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        x, y = probe_windows(pool, seq_len, rng.integers(lo, hi, args.per_bucket), rng)
        hits, bytes_right = [], []
        for i in range(0, len(x), args.batch_size):
            with torch.no_grad(), autocast:
                logits, _ = model(x[i:i + args.batch_size].to(device))
            e, b = score_keys(logits.float().cpu(), y[i:i + args.batch_size])
            hits.append(e)
            bytes_right.append(b)
        exact.append(torch.cat(hits).float().mean().item())
        per_byte.append(torch.cat(bytes_right).mean().item())
    return f"{run_label(path)} ({cfg.model.attention})", cfg, edges, exact, per_byte


def print_table(results):
    """One table per set of distance buckets (checkpoints of one window length share one)."""
    groups = {}
    for r in results:
        groups.setdefault(tuple(r[2]), []).append(r)
    for edges, group in groups.items():
        w = max(max(len(r[0]) for r in group) + 2, 16)
        print(f"{'distance':<14}" + "".join(f"{r[0]:>{w}}" for r in group))
        print(f"{'':<14}" + "".join(f"{'exact / byte':>{w}}" for _ in group))
        for i in range(len(edges) - 1):
            cells = "".join(f"{f'{r[3][i]:.3f} / {r[4][i]:.3f}':>{w}}" for r in group)
            print(f"{f'{edges[i]}-{edges[i + 1] - 1}':<14}{cells}")


def plot(results, out):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, cfg, edges, exact, per_byte) in enumerate(results):
        color = colors[k % len(colors)]
        mids = (edges[:-1] + edges[1:] - 1) / 2
        axes[0].plot(mids, exact, marker="o", color=color, label=label)
        axes[1].plot(mids, per_byte, marker="o", color=color, label=label)
        if cfg.model.attention == "nsa":  # past the sliding window only the compressed and selected branches reach
            for ax in axes:
                ax.axvline(cfg.model.nsa.window, color=color, ls=":", lw=1)
    axes[1].axhline(0.1, color="grey", ls="--", lw=1, label="chance")
    for ax, name in zip(axes, ("exact match of the key", "key bytes right (teacher-forced)")):
        ax.set_xlabel("distance from statement to query (bytes)")
        ax.set_ylabel(name)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_title("retrieval (dotted: NSA window)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        device, autocast = device_and_autocast(args.device)
        results = [probe(path, args, device, autocast) for path in args.checkpoints]
    except (CheckpointError, ConfigError, DataError, BackendError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print_table(results)
    if args.out:
        plot(results, args.out)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
