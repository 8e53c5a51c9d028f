"""Plot the bits-per-byte curves (train and validation) of one or more runs into one PNG.

    python scripts/plot_runs.py runs/quick_nsa runs/quick_dense --out quick.png

Reads RUN_DIR/metrics.jsonl as written by train.py: train "bpb" records, periodic "val_bpb" records
on the fixed validation slice, and the end-of-run "final/val_bpb" over the whole validation split
(drawn as a star). Needs matplotlib (pip install matplotlib).
"""

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (is {run_dir} a train.py run directory?)")
    train, val, final = [], [], None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("bpb") is not None:
            train.append((rec["step"], rec["bpb"]))
        if rec.get("val_bpb") is not None:
            val.append((rec["step"], rec["val_bpb"]))
        if rec.get("final/val_bpb") is not None:
            final = (rec["step"], rec["final/val_bpb"])
    return train, val, final


def plot(run_dirs, out, title=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(run_dirs):
        color = colors[i % len(colors)]
        name = Path(run).resolve().name
        train, val, final = read_metrics(run)
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, lw=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, lw=2, ls="--", marker="o", ms=3, label=f"{name} val")
        if final:
            ax.plot(*final, color=color, marker="*", ms=12, ls="none", label=f"{name} val (full) {final[1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title or "bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output directories")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    plot(args.runs, args.out, args.title)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
