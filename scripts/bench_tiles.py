"""Launch-option sweep of the training kernels at one shape (default: the enwik8 model's, G = 8).

Times, in one process on one card, each kernel with its production tiles and with the alternatives
listed in VARIANTS: range attention (the compressed prefix rule and the sliding window: forward,
backward with other dq or dk/dv tiles, the prefix rule's split programs per SM), selection (the tile
unions and dK/dV's reverse index, dK/dV launches and the other layout of its dots, forward / dQ
launches, on random picks), and the top-n
kernel (whose output must not change). Dense SDPA at the same shape is the last row, for scale.
Median ms a layer.

    python scripts/bench_tiles.py                          # B=8, T=8192, HQ=8, H=1, D=64
    python scripts/bench_tiles.py --shape 32 2048 8 1 64   # B T HQ H D
    python scripts/bench_tiles.py --pick-run 32            # neighbouring tokens share their picks
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import nsa.ops.range_attention as RA  # noqa: E402
import nsa.ops.selection as SEL  # noqa: E402
import nsa.ops.topn as TN  # noqa: E402
import nsa.ops.utils as U  # noqa: E402
from bench_kernels import random_picks  # noqa: E402
from nsa.ops.common import NSAParams, num_compressed_blocks  # noqa: E402
from nsa.ops.compressed import compressed_rule  # noqa: E402
from nsa.ops.window import window_rule  # noqa: E402

# The NSA parameters timed: the defaults, which are the enwik8 configs' (32/16/64/16/512, one memory key).
P = NSAParams()
COMPRESSED_RULE = compressed_rule(P.compress_block, P.compress_stride, P.num_mem)

# Alternatives to time beside production: range tiles (BLOCK_M, BLOCK_N, warps, stages) at D <= 64,
# selection dK/dV (rows, warps, stages), forward / dQ launch options, top-n (BLOCK_M, BJ, warps, stages).
VARIANTS = {
    "range_fwd": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (256, 64, 8, 2),
                  (128, 32, 4, 3)],
    "range_dq": [(128, 64, 4, 2), (64, 128, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    "range_dkdv": [(128, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2),
                   (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 2), (16, 64, 4, 2)],
    "range_splits": [4, 8, 16, 32],
    "sel_dkv": [(64, 4, 2), (128, 4, 1), (128, 4, 3), (128, 8, 2), (256, 4, 1)],
    "sel_walk": [dict(num_warps=4, num_stages=2), dict(num_warps=4, num_stages=4)],
    "topn": [(64, 16, 4, 2), (128, 16, 4, 2), (128, 16, 8, 3), (256, 16, 8, 2), (128, 32, 8, 2)],
}


@contextlib.contextmanager
def patched(module, name, value):
    """module.name = value inside the block (a dict: updated in place), launch choices re-made on entry
    and exit (`utils.fitting` caches them by shape, not by tile)."""
    old = getattr(module, name)
    saved = dict(old) if isinstance(old, dict) else old
    if isinstance(old, dict):
        old.update(value)
    else:
        setattr(module, name, value)
    U._FITTING.clear()
    try:
        yield
    finally:
        if isinstance(old, dict):
            old.update(saved)
        else:
            setattr(module, name, saved)
        U._FITTING.clear()


def median_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=20, rep=80, return_mode="median")


def range_rows(q, do, kv, scale, name, rule):
    k, v = kv
    banded = rule[3] < q.shape[1]
    fwd_table, dkdv_table = ("FWD_TILES_BANDED", "DKDV_TILES_BANDED") if banded else ("FWD_TILES", "DKDV_TILES")
    o, lse = RA.range_attention_fwd(q, k, v, scale, *rule)
    fwd = lambda: RA.range_attention_fwd(q, k, v, scale, *rule)  # noqa: E731
    bwd = lambda: RA.range_attention_bwd(do, q, k, v, o, lse, None, scale, *rule)  # noqa: E731
    yield name, "forward", "production", median_ms(fwd)
    for tile in VARIANTS["range_fwd"]:
        with patched(RA, fwd_table, {64: tile}):
            yield name, "forward", tile, median_ms(fwd)
    yield name, "backward", "production", median_ms(bwd)
    for part, table in (("dq", "DQ_TILES"), ("dkdv", dkdv_table)):
        for tile in VARIANTS["range_" + part]:
            with patched(RA, table, {64: tile}):
                yield name, f"backward, {part} tile", tile, median_ms(bwd)
    if not banded:
        for per_sm in VARIANTS["range_splits"]:
            with patched(RA, "SPLIT_PROGRAMS_PER_SM", per_sm):
                yield name, "backward, splits per SM", per_sm, median_ms(bwd)


def selection_rows(q, k, v, do, scale, pick_run, sel_block=P.sel_block, n=P.num_selected):
    B, T = q.shape[:2]
    idx = random_picks(B, T, k.shape[2], sel_block, n, q.device, run=pick_run)
    o, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    dq, delta = torch.empty_like(q), lse.new_empty(lse.shape)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    walk = SEL.tile_walk(q, k, idx, sel_block)
    fwd = lambda: SEL.selection_fwd(q, k, v, idx, sel_block, scale, o, lse, walk)  # noqa: E731
    dqf = lambda: SEL.selection_dq(do, q, k, v, o, lse, idx, sel_block, scale, dq, delta, walk)  # noqa: E731
    dkv = lambda: SEL.selection_dkv(do, q, k, v, lse, delta, idx, sel_block, scale, dk, dv)  # noqa: E731
    fwd(), dqf()
    yield "selection", "tile unions", "production", median_ms(lambda: SEL.tile_walk(q, k, idx, sel_block))
    # dK/dV's reverse index and work items alone (the counting sort); also inside the dK/dV rows below.
    yield "selection", "reverse index", "production", median_ms(lambda: SEL._dkv_items(idx, k.shape[2], k.shape[1],
                                                                                      sel_block))
    for part, fn in (("forward", fwd), ("dQ", dqf)):
        yield "selection", part, "production", median_ms(fn)
        for launch in VARIANTS["sel_walk"]:
            with patched(SEL, "WALK_LAUNCHES", (launch, *SEL.WALK_LAUNCHES)):
                yield "selection", part, launch, median_ms(fn)
    yield "selection", "dK/dV", "production", median_ms(dkv)
    layout = q.shape[-1] <= SEL.KEYS_MAJOR_MAX_D  # the dots' layout this head dim launches with
    for launch in VARIANTS["sel_dkv"]:
        with patched(SEL, "DKV_LAUNCHES", {layout: (launch, *SEL.DKV_LAUNCHES[layout])}):
            yield "selection", "dK/dV", launch, median_ms(dkv)
    # The other layout of the dK/dV dots, with its own first launch.
    with patched(SEL, "KEYS_MAJOR_MAX_D", -1 if layout else 2**30):
        yield "selection", "dK/dV", "rows-major dots" if layout else "keys-major dots", median_ms(dkv)


def topn_rows(q, ck, cv, scale):
    _, lse = RA.range_attention_fwd(q, ck, cv, scale, *COMPRESSED_RULE)
    run = lambda: TN._topn_launch(q, ck, lse, P.compress_block, P.compress_stride, P.sel_block, P.num_mem,  # noqa: E731
                                  P.num_selected, P.num_initial, P.num_local, P.shared_selection, scale)
    want = run()
    yield "top-n", "forward", "production", median_ms(run)
    for tile in VARIANTS["topn"]:
        with patched(TN, "_tiles", lambda G, per_sel, dtype, t=tile: t):
            same = torch.equal(run(), want)
            yield "top-n", "forward" + ("" if same else " (OUTPUT DIFFERS)"), tile, median_ms(run)


def dense_rows(q, k, v, do):
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)  # noqa: E731
    with torch.no_grad():
        yield "dense SDPA", "forward", "causal", median_ms(sdpa)
    o = sdpa()
    yield "dense SDPA", "backward", "causal", median_ms(
        lambda: torch.autograd.grad(o, (qt, kt, vt), do.transpose(1, 2), retain_graph=True))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=5, default=[8, 8192, 8, 1, 64], metavar=("B", "T", "HQ", "H", "D"))
    p.add_argument("--pick-run", type=int, default=1,
                   help="selection picks shared by runs of this many tokens (1: every token its own random "
                        "picks; 32: neighbours overlap, as a trained model's do)")
    args = p.parse_args()
    if args.pick_run < 1 or 4096 % args.pick_run:
        sys.exit(f"--pick-run must be a power of two from 1 to 4096, got {args.pick_run}")
    if not torch.cuda.is_available():
        sys.exit("bench_tiles.py needs a CUDA GPU")
    B, T, HQ, H, D = args.shape
    if HQ % H or D > 64:
        sys.exit(f"--shape: HQ ({HQ}) must be a multiple of H ({H}) and D ({D}) at most 64 "
                 "(the variants are D <= 64 tiles)")
    torch.manual_seed(0)
    q, do = (torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    nc = P.num_mem + num_compressed_blocks(T, P.compress_block, P.compress_stride)
    ck, cv = (torch.randn(B, nc, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = D**-0.5
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
            f"B={B} T={T} HQ={HQ} H={H} D={D}, bf16, picks shared by runs of {args.pick_run} tokens, median ms")
    lines = [head, "",
             "| kernel | part | launch | ms |", "|---|---|---|---|"]
    parts = [range_rows(q, do, (ck, cv), scale, "compressed", COMPRESSED_RULE),
             range_rows(q, do, (k, v), scale, "window", window_rule(P.window)),
             selection_rows(q, k, v, do, scale, args.pick_run), topn_rows(q, ck, cv, scale), dense_rows(q, k, v, do)]
    for rows in parts:
        for kernel, part, launch, ms in rows:
            lines.append(f"| {kernel} | {part} | {launch} | {ms:.4f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "bench_tiles.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
