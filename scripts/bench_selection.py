"""The selection kernels at the model's own shape, on a trained model's block picks and on random ones.

    python scripts/bench_selection.py --checkpoint runs/enwik8_nsa [--save-picks DIR]
    python scripts/bench_selection.py --picks DIR/picks_0.pt DIR/picks_1.pt   # picks saved earlier
    python scripts/bench_selection.py                                         # random picks only

With --checkpoint, the model runs --batch windows of its validation split (T = its seq_len) and every
NSA layer's top-n picks are recorded (`nsa.analysis.selection_picks`); --save-picks writes them as
int8 tensors [layers, B, T, Hs, n] (-1 padding), a few layers a file. The kernels then run on random
q, k, v at the checkpoint's shape (the timings depend on the picks, not on the values) for random
picks (forced blocks + uniform top-n) and for each layer's real picks, with the production tile and
with the tile heights given by --rows (`selection.MIN_ROWS`: the rows of a forward/dQ tile when
G < 16). --groups times other group sizes on the same picks (HQ = G x H). Printed per pick set: the
mean union size of a tile's lists (blocks a tile loads), forward, dQ and dK/dV times (dK/dV including
its reverse index), and the FLOP floor. Markdown table last; with $OUT
set, also written there.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_kernels import bench_parts, random_picks  # noqa: E402
from nsa.checkpoint import CheckpointError  # noqa: E402
from nsa.config import ConfigError  # noqa: E402
from nsa.data import DataError  # noqa: E402
from nsa.ops import selection  # noqa: E402

# H200 SXM bf16 dense tensor-core rate reached by cuBLAS (docs/BENCHMARKS.md): the FLOP floor's rate.
PEAK_TFLOPS = 790.0
LAYERS_PER_FILE = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="run directory or checkpoint of an NSA model: record its picks")
    p.add_argument("--picks", nargs="*", default=[], help="picks files written by --save-picks")
    p.add_argument("--save-picks", help="folder to write the recorded picks to")
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="data config overrides")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=4, default=[8, 2, 64, 8192], metavar=("HQ", "H", "D", "T"),
                   help="shape when no checkpoint gives one")
    p.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64], help="other tile heights to time")
    p.add_argument("--groups", type=int, nargs="*", default=None,
                   help="query heads per kv head to time with the same picks (default: the model's)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="which layers' picks to time (default all)")
    return p.parse_args(argv)


def record_picks(args):
    from nsa.analysis import device_and_autocast, nsa_layers, selection_picks
    from nsa.checkpoint import model_from_checkpoint
    from nsa.config import load_config, to_dict
    from nsa.data import load_splits

    device, autocast = device_and_autocast("cuda")
    model, cfg = model_from_checkpoint(args.checkpoint, device)
    data_cfg = load_config(base=to_dict(cfg), overrides=[f"data.{o}" for o in args.data]).data
    val = load_splits(data_cfg)["val"]
    T = cfg.train.seq_len
    if len(val) < args.batch * T:
        raise ValueError(f"the validation split ({len(val):,} bytes) holds fewer than --batch {args.batch} windows "
                         f"of {T} bytes")
    x = torch.stack([torch.from_numpy(val[i * T:(i + 1) * T].astype("int64")) for i in range(args.batch)]).to(device)
    with autocast:
        picks = torch.stack([selection_picks(model, x, i) for i in nsa_layers(model)]).to(torch.int8)
    m = cfg.model
    shape = (m.heads, m.kv_heads, m.dim_head, T)
    return picks, shape, m.nsa.sel_block


def save_picks(picks, folder):
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(0, picks.shape[0], LAYERS_PER_FILE):
        torch.save(picks[i:i + LAYERS_PER_FILE].clone(), Path(folder) / f"picks_{i // LAYERS_PER_FILE}.pt")


def floor_ms(idx, HQ, D, sel_block):
    """FLOP floor of forward + dQ + dK/dV: 2 GEMMs forward, 3 in dQ, 4 in dK/dV, over the keys each
    query actually sees (a block's keys s <= t), at PEAK_TFLOPS."""
    B, T, Hs, n = idx.shape
    t = torch.arange(T, device=idx.device).view(1, T, 1, 1)
    start = idx.long() * sel_block
    keys = torch.where(idx >= 0, (t - start + 1).clamp(0, sel_block), 0).sum().item() * (HQ // Hs)
    flops = 2 * D * keys * (2 + 3 + 4)
    return flops / PEAK_TFLOPS / 1e9, flops


def union_per_token(idx, H, T, sel_block, tt):
    _, _, cnt = selection._tile_union(idx, H, T, sel_block, tt)
    return cnt[..., 1].float().mean().item() / tt


def time_parts(q, k, v, do, idx, sel_block):
    """(forward, dQ, dK/dV) ms; the last two from bench_kernels.bench_parts."""
    from triton.testing import do_bench

    scale = q.shape[-1] ** -0.5
    o, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    fwd = do_bench(lambda: selection.selection_fwd(q, k, v, idx, sel_block, scale, o, lse), return_mode="median")
    return (fwd, *bench_parts(q, k, v, do, idx, sel_block, quick=False))


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_selection.py needs a CUDA device")
    import triton

    sel_block, n = 64, 16
    HQ, H, D, T = args.shape
    sets = {}
    if args.checkpoint:
        try:
            picks, (HQ, H, D, T), sel_block = record_picks(args)
        except (CheckpointError, ConfigError, DataError, ValueError) as e:
            sys.exit(f"error: {e}")
        if args.save_picks:
            save_picks(picks, args.save_picks)
    elif args.picks:
        missing = [f for f in args.picks if not Path(f).is_file()]
        if missing:
            sys.exit(f"error: no picks file {missing[0]} (write them with --checkpoint RUN --save-picks DIR)")
        picks = torch.cat([torch.load(f) for f in args.picks])
        T = picks.shape[2]
    else:
        picks = None
    B = args.batch if picks is None else picks.shape[1]
    n = n if picks is None else picks.shape[-1]
    Hs = H if picks is None else picks.shape[3]
    sets["random"] = random_picks(B, T, Hs, sel_block, n, "cuda")
    if picks is not None:
        for i in args.layers if args.layers is not None else range(picks.shape[0]):
            sets[f"layer {i}"] = picks[i].to("cuda", torch.int32).contiguous()

    env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}"
    print(f"{env}; B={B} T={T} HQ={HQ} H={H} D={D} l'={sel_block} n={n}; command: {' '.join(sys.argv)}", flush=True)
    lines = ["| G | picks | tile rows | union blocks / token | fwd ms | dQ ms | dK/dV ms | total ms | floor ms "
             "| x floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = selection.MIN_ROWS
    try:
        for G in args.groups or [HQ // H]:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, do = (torch.randn(B, T, G * H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            # G >= 16 tiles are one token's heads whatever MIN_ROWS says: only the production tile.
            prod_rows = triton.next_power_of_2(G) if G >= 16 else base
            for name, idx in sets.items():
                floor, _ = floor_ms(idx, G * H, D, sel_block)
                for rows in [prod_rows] + ([r for r in args.rows if r != prod_rows] if G < 16 else []):
                    selection.MIN_ROWS = rows  # the one constant that sets a small-G tile's height
                    tt = 1 if G >= 16 else rows // G
                    u = union_per_token(idx, H, T, sel_block, tt)
                    fwd, t_dq, t_dkv = time_parts(q, k, v, do, idx, sel_block)
                    total = fwd + t_dq + t_dkv
                    lines.append(f"| {G} | {name} | {rows}{' (production)' if rows == prod_rows else ''} | {u:.2f} | "
                                 f"{fwd:.3f} | {t_dq:.3f} | {t_dkv:.3f} | {total:.3f} | {floor:.3f} | "
                                 f"{total / floor:.1f} |")
                    print(lines[-1], flush=True)
                    selection.MIN_ROWS = base
            del q, do, k, v
            torch.cuda.empty_cache()
    finally:
        selection.MIN_ROWS = base
    table = "\n".join([env, ""] + lines)
    print(table)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "bench_selection.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
