"""Where one training step's GPU time goes: torch.profiler over a few steps of a config's model.

Prints the ops with the most CUDA time, then the kernels by their full names (ms a step), so the
slowest parts of an NSA layer can be compared against the dense twin's. Needs a CUDA GPU.

    python scripts/profile_train.py --config configs/enwik8_nsa.yaml --T 8192 --batch 8 --compile
    python scripts/profile_train.py --config configs/enwik8_dense.yaml --T 8192 --batch 8 --compile
    python scripts/profile_train.py --checkpoint runs/enwik8_nsa --T 8192 --batch 8 --compile
    python scripts/profile_train.py --config configs/enwik8_nsa.yaml --compile --gaps 20

--gaps N also prints where the GPU idles inside the profiled steps: the N largest totals of the time
between one kernel's end and the next one's start, by the pair of kernels around the gap. The
profiler slows the host: where the host is what the GPU waits for (NSA's many small launches), the
profiled gaps are larger than an unprofiled step's; the unprofiled idle time is the printed wall time
minus kernel time.

With --config the model is freshly initialised and the batch is random bytes, so NSA's block picks
are an untrained model's. With --checkpoint the model is the trained one and the batch is the first
windows of its training split: a trained model's picks overlap between neighbouring tokens, which
the selection kernels exploit, so this is the step a training run has.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402
from nsa.config import load_config  # noqa: E402
from nsa.data import DataError, first_windows, load_splits  # noqa: E402
from nsa.model import Transformer  # noqa: E402


def idle_gaps(kernels):
    """kernels: (name, start, end) of the GPU's kernels in time order -> {(before, after): [total idle
    time, count]} over the gaps between one kernel's end and the next one's start."""
    gaps = defaultdict(lambda: [0.0, 0])
    for (a, _, end), (b, start, _) in zip(kernels, kernels[1:]):
        if start > end:
            gaps[(a, b)][0] += start - end
            gaps[(a, b)][1] += 1
    return dict(gaps)


def device_kernels(prof):
    """(name, start, end) in microseconds of every kernel, memset and copy the GPU ran, in time order.
    `key_averages` is no base for a total: it lists an Inductor kernel twice (the kernel, and the CPU
    event that launched it, charged the same device time)."""
    return sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[1])


def kernel_totals(kernels):
    """kernels: (name, start, end) -> {name: [total time, count]}, by full kernel name (the op table above
    truncates names, and two kernels whose names share a prefix land on one line there)."""
    totals = defaultdict(lambda: [0.0, 0])
    for name, start, end in kernels:
        totals[name][0] += end - start
        totals[name][1] += 1
    return dict(totals)


def print_kernels(kernels, steps, rows):
    print("kernels by GPU time, full names (ms a step, launches a step):")
    for name, (t, n) in sorted(kernel_totals(kernels).items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {t / 1e3 / steps:7.3f} ms  {n / steps:6.1f}x  {name}")


def print_gaps(kernels, steps, rows):
    gaps = idle_gaps(kernels)
    total = sum(g for g, _ in gaps.values())
    print(f"idle GPU time between kernels: {total / 1e3 / steps:.1f} ms a step, largest by the kernels around it:")
    for (a, b), (g, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {g / 1e3 / steps:7.3f} ms  {n / steps:6.1f}x  {a[:45]} -> {b[:45]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config: fresh weights, random bytes")
    src.add_argument("--checkpoint", help="a checkpoint or run directory: its weights, its training bytes")
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after 3 warm-up steps")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as train.py does on CUDA")
    p.add_argument("--gaps", type=int, default=0, help="also print the N largest idle gaps between kernels")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_train.py needs a CUDA GPU")

    if args.checkpoint:
        try:
            model, cfg = model_from_checkpoint(args.checkpoint, "cuda")
            x = first_windows(load_splits(cfg.data)["train"], args.batch, args.T).cuda()
        except (CheckpointError, DataError) as e:
            sys.exit(f"error: {e}")
        model.train()
    else:
        model = Transformer(load_config(args.config).model).cuda()
        x = torch.randint(0, 256, (args.batch, args.T + 1), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if args.compile:
        model = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # torch.compile and Triton compile on the first calls
        step()
    # Wall time of the same steps unprofiled: against the profile's kernel time it shows how long the
    # GPU runs no kernel (launch gaps, host work it waits for).
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"{args.config or args.checkpoint}, T={args.T}, batch={args.batch}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, compile={args.compile}; CUDA time summed over {args.steps} steps")
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    kernels = device_kernels(prof)
    kernel_ms = sum(end - start for _, start, end in kernels) / 1e3 / args.steps
    print(f"per step: wall {wall_ms:.1f} ms (unprofiled), kernels {kernel_ms:.1f} ms, GPU without a kernel "
          f"{wall_ms - kernel_ms:.1f} ms")
    print_kernels(kernels, args.steps, args.rows)
    if args.gaps:
        print_gaps(kernels, args.steps, args.gaps)


if __name__ == "__main__":
    main()
