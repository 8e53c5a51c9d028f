"""Plot the bits-per-byte curves (train and validation) of one or more runs into one PNG.

    python scripts/plot_runs.py runs/quick_nsa runs/quick_dense --out quick.png [--x step|tokens|time]

Reads RUN_DIR/metrics.jsonl as written by train.py: train "bpb" records, periodic "val_bpb" records
on the fixed validation slice, and the final record's whole-split "final/val_bpb" (drawn as a star)
and "final/test_bpb", both given in the legend. The x axis: optimizer steps, bytes seen ("tokens",
or step x the run's bytes per step), or training seconds ("train_s": compile warm-up, evaluation,
sampling and checkpointing are not training time). Lines a killed write cut off are skipped.
Needs matplotlib (pip install matplotlib).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa.metrics import read_records  # noqa: E402

X_LABELS = {"step": "step", "tokens": "bytes seen",
            "time": "training seconds (no compile warm-up, evaluation or checkpointing)"}


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (is {run_dir} a train.py run directory?)")
    records, bad = read_records(path)
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return records


def x_of(records, x, run_dir):
    """record -> its x value (None where it has none) for axis `x`."""
    if x == "step":
        return lambda r: r["step"]
    if x == "tokens":
        per_step = next((r["tokens"] / r["step"] for r in records if r.get("tokens") and r["step"]), None)
        if per_step is None:
            raise SystemExit(f"error: {run_dir} logs no \"tokens\": plot it with --x step")
        return lambda r: r.get("tokens", r["step"] * per_step)
    if not any("train_s" in r for r in records):
        raise SystemExit(f"error: {run_dir} logs no \"train_s\" (written before train.py kept training time): "
                         "plot it with --x step or tokens")
    return lambda r: r.get("train_s")


def curves(run_dir, x="step"):
    """-> (train [(x, bpb)], val [(x, val_bpb)], final: (x, val_bpb, test_bpb or None) or None)."""
    records = read_metrics(run_dir)
    at = x_of(records, x, run_dir)
    train = [(at(r), r["bpb"]) for r in records if r.get("bpb") is not None and at(r) is not None]
    val = [(at(r), r["val_bpb"]) for r in records if r.get("val_bpb") is not None and at(r) is not None]
    final = None
    for r in records:
        if r.get("final/val_bpb") is not None and at(r) is not None:
            final = (at(r), r["final/val_bpb"], r.get("final/test_bpb"))
    return train, val, final


def final_label(name, final):
    _, val, test = final
    return f"{name} final: val {val:.3f}" + (f" / test {test:.3f}" if test is not None else "") + " (whole split)"


def plot(run_dirs, out, title=None, x="step"):
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
        train, val, final = curves(run, x)
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, lw=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, lw=2, ls="--", marker="o", ms=3, label=f"{name} val")
        if final:
            ax.plot(final[0], final[1], color=color, marker="*", ms=12, ls="none", label=final_label(name, final))
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("bits per byte")
    ax.set_title(title or "bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    return labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output directories")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--x", choices=list(X_LABELS), default="step",
                   help="x axis: optimizer steps, bytes seen, or training seconds (default: step)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    labels = plot(args.runs, args.out, args.title, args.x)
    print(f"wrote {args.out}", file=sys.stderr)
    return labels


if __name__ == "__main__":
    main()
