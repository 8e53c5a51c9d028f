"""Whole-model training throughput (tokens/s): NSA vs its dense twin, and vs the seed implementation.

One training step = forward + backward + AdamW at bf16 autocast, the same micro-batch of
`--tokens` tokens at every context length (batch = tokens / T). Median over `--iters` steps after
`--warmup`. Prints a markdown table last; with $OUT set, writes it and the raw numbers there.

    python scripts/bench_train.py                       # enwik8 configs at T = 512, 2k, 8k, 32k + seed
    python scripts/bench_train.py --T 512 8192 --no-seed
    python scripts/bench_train.py --compile --compile-mode default reduce-overhead --T 8192 --no-seed
    python scripts/bench_train.py --compile --T 8192 --no-seed --repeats 3   # NSA, dense, NSA, dense, ...
    python scripts/bench_train.py --compile --T 8192 --no-seed --nsa-checkpoint runs/enwik8_nsa \
        --dense-checkpoint runs/enwik8_dense

By default the models are freshly initialised and the batch is random bytes: NSA's block picks are then
an untrained model's, spread more evenly over the context than a trained model's, whose neighbouring
tokens pick mostly the same blocks (which the selection kernels exploit). With --nsa-checkpoint /
--dense-checkpoint that model is the trained one and its batch the first windows of its training
split: the step a training run has once it has learned something.

Run-to-run spread of one model's step on one card is a few percent (more between machines), as large
as the changes being compared: --repeats N measures the pair N times, alternating, and the table gives
the median and the range of each.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa.checkpoint import CheckpointError, config_from_checkpoint, load_checkpoint, load_weights  # noqa: E402
from nsa.config import ModelConfig, NSAConfig, load_config  # noqa: E402
from nsa.data import DataError, first_windows, load_splits  # noqa: E402
from nsa.model import Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def time_steps(model, x, warmup, iters, loss_fn):
    """Tokens/s of the training step on the batch x [batch, T + 1]: median over `iters` after `warmup`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays; no-op otherwise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return x[:, 1:].numel() / statistics.median(times)


def ours_loss(model, x):
    return model(x[:, :-1], x[:, 1:])[1]


def measure(name, build, T, batch, args, mode, loss_fn=ours_loss, data=None):
    """One row: tokens/s and peak memory of `build()`'s training step, eager or torch.compile'd in `mode`,
    on the first windows of `data` (a byte split), or on random bytes if None."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"name": name, "T": T, "batch": batch, "mode": mode}
    try:
        model = build().cuda()
        if mode != "eager":
            model = torch.compile(model, mode=None if mode == "default" else mode)
        x = (torch.randint(0, 256, (batch, T + 1)) if data is None else first_windows(data, batch, T)).cuda()
        tps = time_steps(model, x, args.warmup, args.iters, loss_fn)
        peak = torch.cuda.max_memory_allocated() / 2**30
        del model
        return {**row, "tokens_per_s": tps, "peak_gib": peak}
    except Exception as e:  # a failed row (e.g. out of memory) is reported, the rest still run
        return {**row, "error": f"{type(e).__name__}: {str(e)[:120]}"}


def summarize(rows):
    """One row per (name, T, mode) in first-seen order: the median tokens/s of its measurements, their
    range ('min-max', or '' for one), and the largest peak; a row whose every measurement failed keeps
    the first error."""
    groups = {}
    for r in rows:
        groups.setdefault((r["name"], r["T"], r["mode"]), []).append(r)
    out = []
    for runs in groups.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(runs[0])
            continue
        tps = [r["tokens_per_s"] for r in ok]
        spread = f"{min(tps):,.0f}-{max(tps):,.0f}" if len(tps) > 1 else ""
        out.append({**ok[0], "tokens_per_s": statistics.median(tps), "range": spread,
                    "peak_gib": max(r["peak_gib"] for r in ok), "measurements": len(tps)})
    return out


class Source:
    """Where one model of the pair comes from: a config (fresh weights, random bytes) or a checkpoint (its
    weights, its training split's bytes)."""

    def __init__(self, config, checkpoint=None, attention=None):
        self.checkpoint, self.weights, self.data = checkpoint, None, None
        if checkpoint is None:
            self.cfg = load_config(config).model
            return
        try:
            state = load_checkpoint(checkpoint)
            cfg = config_from_checkpoint(state, checkpoint)
            self.cfg, self.weights, self.data = cfg.model, state["model"], load_splits(cfg.data)["train"]
        except (CheckpointError, DataError) as e:
            sys.exit(f"error: {e}")
        if attention is not None and self.cfg.attention != attention:
            sys.exit(f"error: {checkpoint} is a model.attention={self.cfg.attention} model, not {attention}")

    def build(self):
        model = Transformer(self.cfg)
        return model if self.weights is None else load_weights(model, self.weights, self.checkpoint).train()

    def describe(self):
        return "fresh weights, random bytes" if self.checkpoint is None else f"{self.checkpoint}, its training bytes"


def seed_model_cfg(attention):
    """The seed implementation's training-script model: 6 layers, dim 512, 8 / 4 heads, 16/8/16/4/64."""
    return ModelConfig(dim=512, depth=6, heads=8, kv_heads=4, dim_head=64, attention=attention,
                       nsa=NSAConfig(compress_block=16, compress_stride=8, sel_block=16, num_selected=4,
                                     window=64))


def build_seed_peer():
    from native_sparse_attention_pytorch.transformer import Transformer as SeedTransformer

    return SeedTransformer(num_tokens=256, dim=512, depth=6, heads=8, kv_heads=4, use_sparse_attn=True,
                           use_flex_sliding_window=True, use_triton_fine_selection=True,
                           sparse_attn_kwargs=dict(sliding_window_size=64, compress_block_size=16,
                                                   compress_block_sliding_stride=8, selection_block_size=16,
                                                   num_selected_blocks=4))


def seed_loss(model, x):
    return model(x, return_loss=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsa-config", default=str(ROOT / "configs/enwik8_nsa.yaml"))
    p.add_argument("--dense-config", default=str(ROOT / "configs/enwik8_dense.yaml"))
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step at every T")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", nargs="+", default=["default"],
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile modes with --compile, each timed in turn; reduce-overhead replays the "
                        "step as CUDA graphs")
    p.add_argument("--no-seed", action="store_true", help="skip the seed-implementation comparison")
    p.add_argument("--repeats", type=int, default=1, help="measurements of each model, NSA and dense alternating")
    p.add_argument("--nsa-checkpoint", help="time this trained NSA model (checkpoint or run directory) on its "
                                            "training bytes instead of --nsa-config's fresh one")
    p.add_argument("--dense-checkpoint", help="the same for the dense twin")
    args = p.parse_args()
    if args.repeats < 1:
        sys.exit(f"--repeats must be >= 1, got {args.repeats}")
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")

    rows = []
    sources = {"nsa": Source(args.nsa_config, args.nsa_checkpoint, "nsa"),
               "dense": Source(args.dense_config, args.dense_checkpoint, "dense")}
    modes = args.compile_mode if args.compile else ["eager"]
    for T in args.T:
        batch = max(1, args.tokens // T)
        for mode in modes:
            for _ in range(args.repeats):
                for name, src in sources.items():
                    rows.append(measure(name, src.build, T, batch, args, mode, data=src.data))
                    print(rows[-1], flush=True)
    if not args.no_seed:
        batch = max(1, args.tokens // 512)
        mode = modes[0]
        rows.append(measure("seed-model nsa (ours)", lambda: Transformer(seed_model_cfg("nsa")), 512, batch, args,
                            mode))
        rows.append(measure("seed-model dense (ours)", lambda: Transformer(seed_model_cfg("dense")), 512, batch, args,
                            mode))
        peer = "seed-model nsa (native-sparse-attention-pytorch)"
        rows.append(measure(peer, build_seed_peer, 512, batch, args, mode, seed_loss))
        if mode != "eager" and "error" in rows[-1]:
            # Its Triton kernel does not build under torch.compile: compare against its eager run.
            print(f"{peer} under torch.compile: {rows[-1]['error']}; timing it eager", flush=True)
            rows[-1] = measure(peer + " (eager: fails under torch.compile)", build_seed_peer, 512, batch, args,
                               "eager", seed_loss)
        for r in rows[-3:]:
            print(r, flush=True)

    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, compile={args.compile}, repeats={args.repeats}",
             *(f"{name}: {src.describe()}" for name, src in sources.items()),
             "", "| model | T | batch | mode | tokens/s (median) | range | peak GiB |", "|---|---|---|---|---|---|---|"]
    summary = summarize(rows)
    for r in summary:
        head = f"| {r['name']} | {r['T']} | {r['batch']} | {r['mode']} |"
        lines.append(f"{head} {r['error']} | | |" if "error" in r else
                     f"{head} {r['tokens_per_s']:,.0f} | {r['range']} | {r['peak_gib']:.2f} |")
    by = {(r["name"], r["T"], r["mode"]): r.get("tokens_per_s") for r in summary}
    lines += ["", "| T | mode | NSA / dense |", "|---|---|---|"]
    for T in args.T:
        for mode in modes:
            n, d = by.get(("nsa", T, mode)), by.get(("dense", T, mode))
            lines.append(f"| {T} | {mode} | {n / d:.2f}x |" if n and d else f"| {T} | {mode} | n/a |")
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "bench_train.md").write_text(table + "\n")
        Path(os.environ["OUT"], "bench_train.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
