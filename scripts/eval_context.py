"""Validation bits per byte by position in the context window, for one or more checkpoints.

    python scripts/eval_context.py runs/enwik8_nsa runs/enwik8_dense --out context.png [--buckets 256] [--batches 8]

Each checkpoint is evaluated on the first windows of the validation split of its own data config
(train.py's fixed validation slice: --batches micro-batches of train.batch_size windows of
train.seq_len bytes; --data KEY=VALUE overrides data settings, e.g. --data source=file path=F).
The loss of every byte position is averaged over the windows, then over buckets of --buckets
positions. A model that uses its long context predicts late positions better than early ones.
Prints a table (a row per bucket, a column per checkpoint) and draws every checkpoint into one PNG.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa.analysis import bucket_means, device_and_autocast, loss_by_position, pyplot, run_label  # noqa: E402
from nsa.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from nsa.config import ConfigError, load_config, to_dict  # noqa: E402
from nsa.data import DataError, eval_windows, iter_eval_batches, load_splits  # noqa: E402
from nsa.ops import BackendError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint files or run directories")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--buckets", type=int, default=256, help="bytes of window per bucket")
    p.add_argument("--batches", type=int, default=8, help="micro-batches of windows per checkpoint")
    p.add_argument("--batch-size", type=int, default=0, help="windows per micro-batch (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the checkpoint's train.seq_len)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="data config overrides")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["auto", "torch", "flex", "triton"],
                   help="override the checkpoints' nsa.backend")
    args = p.parse_args(argv)
    for name in ("buckets", "batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.batch_size < 0 or args.seq_len < 0:
        p.error("--batch-size and --seq-len must be positive (0: the checkpoint's)")
    return args


def context_curve(path, args, device, autocast, splits_cache):
    """(label, seq_len, per-bucket bits per byte) of one checkpoint."""
    model, cfg = model_from_checkpoint(path, device)
    if args.backend is not None:
        cfg.model.nsa.backend = args.backend  # the one NSAConfig every layer of the model reads
    data_cfg = load_config(base=to_dict(cfg), overrides=[f"data.{o}" for o in args.data]).data
    key = repr(data_cfg)
    if key not in splits_cache:
        splits_cache[key] = load_splits(data_cfg)
    data = splits_cache[key][args.split]
    seq_len = args.seq_len or cfg.train.seq_len
    batch_size = args.batch_size or cfg.train.batch_size
    starts = eval_windows(data, seq_len, args.batches * batch_size)
    batches = ((x, y) for x, y in iter_eval_batches(data, seq_len, batch_size, starts, device) if x.shape[1] == seq_len)
    with autocast:
        per_pos = loss_by_position(model, batches)
    return f"{run_label(path)} ({cfg.model.attention})", seq_len, bucket_means(per_pos, args.buckets)


def print_table(curves, bucket):
    rows = max(len(c) for _, _, c in curves)
    w = max(len(label) for label, _, _ in curves) + 2
    print(f"{'bytes':<13}" + "".join(f"{label:>{w}}" for label, _, _ in curves))
    for i in range(rows):
        cells = "".join(f"{c[i].item():{w}.4f}" if i < len(c) else f"{'-':>{w}}" for _, _, c in curves)
        print(f"{i * bucket:>6}-{(i + 1) * bucket - 1:<6}{cells}")
    print(f"{'mean':<13}" + "".join(f"{c.mean().item():{w}.4f}" for _, _, c in curves))


def plot(curves, bucket, out):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, seq_len, c in curves:
        mids = [min(i * bucket + bucket / 2, seq_len) for i in range(len(c))]
        ax.plot(mids, c.tolist(), marker="o", ms=3, label=label)
    ax.set_xlabel("position in the context window (bytes)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"validation bits per byte by position (buckets of {bucket} bytes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        device, autocast = device_and_autocast(args.device)
        splits_cache = {}
        curves = [context_curve(path, args, device, autocast, splits_cache) for path in args.checkpoints]
    except (CheckpointError, ConfigError, DataError, BackendError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print_table(curves, args.buckets)
    plot(curves, args.buckets, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
