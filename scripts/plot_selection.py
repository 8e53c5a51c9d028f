"""Which selection blocks an NSA layer picked for each query of one validation window, and the mean
gate of every branch per layer.

    python scripts/plot_selection.py runs/enwik8_nsa --out selection.png [--layer L] [--window I] [--data KEY=VALUE ...]

Runs window --window (0: the first) of the validation split of the checkpoint's data config (--data
KEY=VALUE overrides it, e.g. --data source=retrieval) through the model. Left panels, one per
selection head (the kv heads with shared selection; the first --heads of them): a query x block
image, bright where the query picked the block (queries binned into --rows rows: the fraction of the
bin's queries that picked it). The forced blocks show as the first column and the diagonal. Right
panel: the mean sigmoid gate of the compressed, selected and window branches of every NSA layer on
the same window. Prints the gates.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa.analysis import (BRANCHES, branch_gates, device_and_autocast, nsa_layers, pyplot, run_label,  # noqa: E402
                          selection_map, selection_picks)
from nsa.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from nsa.config import ConfigError, load_config, to_dict  # noqa: E402
from nsa.data import DataError, load_splits  # noqa: E402
from nsa.ops import BackendError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory of an NSA model")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--layer", type=int, default=None, help="block index (default: the last NSA layer)")
    p.add_argument("--window", type=int, default=0, help="which window of the split (window i starts at i * seq_len)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the checkpoint's train.seq_len)")
    p.add_argument("--heads", type=int, default=4, help="panels for at most this many selection heads")
    p.add_argument("--rows", type=int, default=512, help="query bins of the image (at most one per query)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="data config overrides")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["auto", "torch", "flex", "triton"],
                   help="override the checkpoint's nsa.backend")
    args = p.parse_args(argv)
    for name in ("heads", "rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.window < 0 or args.seq_len < 0:
        p.error("--window and --seq-len must be >= 0")
    return args


def load_window(cfg, args, device):
    data_cfg = load_config(base=to_dict(cfg), overrides=[f"data.{o}" for o in args.data]).data
    data = load_splits(data_cfg)[args.split]
    seq_len = args.seq_len or cfg.train.seq_len
    start = args.window * seq_len
    if start + seq_len > len(data):
        raise ValueError(f"window {args.window} of {seq_len} bytes is past the end of the {args.split} split "
                         f"({len(data):,} bytes, {len(data) // seq_len} whole windows)")
    return torch.from_numpy(data[start:start + seq_len].astype("int64"))[None].to(device)


def plot(maps, gates, layers, label, layer, T, cfg, out):
    plt = pyplot()
    n = len(maps)
    fig, axes = plt.subplots(1, n + 1, figsize=(4 * n + 5, 5), gridspec_kw={"width_ratios": [3] * n + [2]},
                             layout="constrained")
    for h, ax in enumerate(axes[:n]):
        m = maps[h]
        im = ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1,
                       extent=(0, m.shape[1], T, 0))
        ax.set_title(f"selection head {h}")
        ax.set_xlabel(f"selection block ({cfg.model.nsa.sel_block} bytes)")
        if h == 0:
            ax.set_ylabel("query position (bytes)")
    fig.colorbar(im, ax=list(axes[:n]), label="fraction of the row's queries that picked it")
    ax = axes[-1]
    width = 0.8 / len(BRANCHES)
    for b, name in enumerate(BRANCHES):
        ax.bar([i + (b - 1) * width for i in range(len(layers))], gates[:, b].tolist(), width, label=name)
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("NSA layer")
    ax.set_ylabel("mean gate")
    ax.set_ylim(0, 1)
    ax.set_title("branch gates")
    ax.legend(fontsize=8)
    fig.suptitle(f"{label}: layer {layer}, top-{cfg.model.nsa.num_selected} blocks per query")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        device, autocast = device_and_autocast(args.device)
        model, cfg = model_from_checkpoint(args.checkpoint, device)
        layers = nsa_layers(model)
        if not layers:
            raise ValueError(f"{args.checkpoint} is a dense model (model.attention: {cfg.model.attention}); "
                             "plot_selection needs an NSA model")
        layer = layers[-1] if args.layer is None else args.layer
        if layer not in layers:
            raise ValueError(f"--layer {layer} is not an NSA layer of this model (NSA layers: {layers})")
        if args.backend is not None:
            cfg.model.nsa.backend = args.backend  # the one NSAConfig every layer of the model reads
        x = load_window(cfg, args, device)
        with autocast:
            picks = selection_picks(model, x, layer)[0]
            gates = branch_gates(model, x)
    except (CheckpointError, ConfigError, DataError, BackendError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    T = x.shape[1]
    num_blocks = -(-T // cfg.model.nsa.sel_block)
    maps = selection_map(picks[:, :args.heads], num_blocks, args.rows)
    print(f"{'layer':<8}" + "".join(f"{b:>8}" for b in BRANCHES))
    for i, g in zip(layers, gates):
        print(f"{i:<8}" + "".join(f"{v:8.3f}" for v in g.tolist()))
    plot(maps, gates, layers, run_label(args.checkpoint), layer, T, cfg, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
