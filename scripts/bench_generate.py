"""Decode benchmarks (GPU): the NSA Triton decode step vs dense SDPA decode, and cached generation.

(a) One attention decode step per layer, paper setting HQ=64, H=4, D=128, l/d/l'/n/w = 32/16/64/16/512,
    bf16, context 8k..64k, batch 1 and 16: `nsa.ops.decode.decode_attention` (four split kernels) vs
    F.scaled_dot_product_attention of one query over the full dense cache. Median ms, the bytes each
    reads (estimated from what it must load) and the achieved GB/s. --extra-contexts (default 32768)
    are always added to --contexts. --breakdown also prints each decode kernel's GPU time (profiler).
(b) Whole-model cached generation, batch 1, 8k context: tokens/s of the NSA model and its dense twin
    (configs/enwik8_nsa.yaml / enwik8_dense.yaml, else dim 512 depth 8), random weights, bf16, the
    decode step captured in a CUDA graph (--modes: also torch.compile'd then graphed, or eager).

Prints a markdown table last; with env OUT set, also writes $OUT/bench_generate.{md,json}.

    python scripts/bench_generate.py                 # everything, ~1-2 min on an H100
    python scripts/bench_generate.py --skip-model --contexts 8192 65536 --batches 1
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--extra-contexts", type=int, nargs="*", default=[32768],
                   help="(a): contexts timed in addition to --contexts")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--breakdown", action="store_true", help="(a): per-kernel GPU times of the NSA decode step")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=128)
    p.add_argument("--skip-kernel", action="store_true", help="skip (a), the attention decode step")
    p.add_argument("--skip-model", action="store_true", help="skip (b), whole-model generation")
    p.add_argument("--model-context", type=int, default=8192, help="(b): prompt + new tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="(b): tokens generated (timed)")
    p.add_argument("--modes", nargs="+", default=["cuda_graph"], choices=["cuda_graph", "compile", "eager"],
                   help="(b): how the decode step runs: captured in a CUDA graph, torch.compile'd then captured "
                        "(fuses the step's small ops), or eager")
    return p.parse_args()


PAPER = dict(block=32, stride=16, sel_block=64, num_selected=16, window=512, num_mem=1)


def bench_ms(fn, reps=100, graph=True):
    """Median GPU ms of fn. graph: replayed from a CUDA graph, as generation runs it, so the figure is
    the GPU's time and not Python's launch overhead (eager timing of a few-microsecond kernel measures
    the host)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return do_bench_cudagraph(fn, rep=reps, return_mode="median")
    return do_bench(fn, warmup=25, rep=reps, return_mode="median")


def nsa_bytes(B, H, T, D, c, gate_weights=0, elt=2):
    """Bytes the decode step must read for token t = T - 1: compressed keys + values (once), the selected
    blocks' and the window's keys + values, the gate projection's gate_weights weights (the split-K
    partials, a few % more, are not counted)."""
    t = T - 1
    n_vis = (t + 1 - c["block"]) // c["stride"] + 1 if t + 1 >= c["block"] else 0
    rows = c["num_mem"] + n_vis
    sel = min(c["num_selected"], t // c["sel_block"] + 1) * c["sel_block"]
    win = min(c["window"], t + 1)
    return B * H * D * elt * (2 * rows + 2 * sel + 2 * win) + gate_weights * elt


def kernel_bench(args, rows):
    import torch
    import torch.nn.functional as F

    from nsa.ops import reference
    from nsa.ops.common import NSAParams
    from nsa.ops.decode import decode_attention

    HQ, H, D = args.heads, args.kv_heads, args.dim_head
    c = PAPER
    dev, dt = "cuda", torch.bfloat16
    contexts = sorted(set(args.contexts) | set(args.extra_contexts or []))
    for B in args.batches:
        for T in contexts:
            torch.cuda.empty_cache()
            nc = (T - c["block"]) // c["stride"] + 1
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(B, HQ, D, device=dev, dtype=dt, generator=g)
            q_rot = torch.randn(B, HQ, D, device=dev, dtype=dt, generator=g)
            ck = torch.randn(B, c["num_mem"] + nc, H, D, device=dev, dtype=dt, generator=g)
            cv = torch.randn_like(ck)
            k = torch.randn(B, T, H, D, device=dev, dtype=dt, generator=g)
            v = torch.randn_like(k)
            # The gates' projection from a layer input of HQ * D features (the decode op computes the gates)
            x = torch.randn(B, HQ * D, device=dev, dtype=dt, generator=g)
            w_gate = torch.randn(3 * HQ, HQ * D, device=dev, dtype=dt, generator=g) * (HQ * D) ** -0.5
            b_gate = torch.zeros(3 * HQ, device=dev, dtype=dt)
            t = torch.full((B,), T - 1, device=dev, dtype=torch.int32)
            p = NSAParams(compress_block=c["block"], compress_stride=c["stride"], sel_block=c["sel_block"],
                          num_mem=c["num_mem"], num_selected=c["num_selected"], window=c["window"])

            def nsa():
                return decode_attention(q, q_rot, ck, cv, k, v, k, v, x, w_gate, b_gate, t, p)

            # Correctness spot check against the reference (batch row 0 only: the reference is slow).
            o, idx = decode_attention(q, q_rot, ck, cv, k, v, k, v, x, w_gate, b_gate, t, p, return_indices=True)
            o_ref, idx_ref = reference.decode_attention(*(a[:1] for a in (q, q_rot, ck, cv, k, v, k, v, x)), w_gate,
                                                        b_gate, t[:1], p, return_indices=True)
            err = (o[:1].float() - o_ref.float()).abs().max().item()
            big = torch.iinfo(torch.int32).max  # the kernel's picks are in pick order: sort, -1 last
            idx_s = torch.where(idx[:1] < 0, big, idx[:1]).sort(-1).values
            idx_ok = bool(torch.equal(torch.where(idx_s == big, -1, idx_s), idx_ref))
            ms_nsa, ms_nsa_eager = bench_ms(nsa), bench_ms(nsa, graph=False)
            if args.breakdown:
                try:
                    print(f"B={B} T={T} NSA decode kernels:\n" + kernel_breakdown(nsa), flush=True)
                except Exception as e:  # the profiler is a diagnostic only
                    print(f"kernel breakdown failed: {e!r}", flush=True)
            # Dense: one query over the whole cache, in SDPA's preferred [B, H, T, D] layout.
            kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            del k, v
            qd = q_rot[:, :, None]

            def dense():
                return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

            ms_dense, ms_dense_eager = bench_ms(dense), bench_ms(dense, graph=False)
            b_nsa = nsa_bytes(B, H, T, D, c, w_gate.numel())
            b_dense = B * H * T * D * 2 * 2
            rows.append(dict(part="attention", batch=B, context=T, nsa_ms=ms_nsa, dense_ms=ms_dense,
                             nsa_eager_ms=ms_nsa_eager, dense_eager_ms=ms_dense_eager,
                             speedup=ms_dense / ms_nsa, nsa_bytes=b_nsa, dense_bytes=b_dense,
                             bytes_ratio=b_nsa / b_dense, nsa_gbps=b_nsa / ms_nsa / 1e6,
                             dense_gbps=b_dense / ms_dense / 1e6, max_err_vs_reference=err,
                             indices_match_reference=idx_ok))
            r = rows[-1]
            print(f"attention B={B} T={T}: nsa {ms_nsa:.4f} ms ({r['nsa_gbps']:.0f} GB/s), dense {ms_dense:.4f} ms "
                  f"({r['dense_gbps']:.0f} GB/s), bytes {r['bytes_ratio']:.3f}x dense, err {err:.2e}, indices match "
                  f"reference: {idx_ok}", flush=True)
            del kd, vd, ck, cv


def kernel_breakdown(fn, reps=20):
    """GPU time per kernel of one call of fn (mean over reps), from the torch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.device_time_total / reps
    total = sum(times.values())
    lines = [f"    {us:8.2f} us  {name[:70]}" for name, us in sorted(times.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines + [f"    {total:8.2f} us  total GPU time per step"])


def model_cfg(name):
    """The model of configs/enwik8_{name}.yaml, the pair the training benchmarks use."""
    from nsa.config import load_config

    return load_config(os.path.join(ROOT, "configs", f"enwik8_{name}.yaml")).model


def model_bench(args, rows):
    import torch

    from nsa.generation import cast_model, generate
    from nsa.model import Transformer

    try:  # the parallel Triton ops, for a fast prefill; the decode step uses nsa/ops/decode.py either way
        import nsa.ops.triton_ops  # noqa: F401

        prefill_backend = "triton"
    except ImportError:
        prefill_backend = "torch"
    for mode, name in ((m, n) for m in args.modes for n in ("nsa", "dense")):
        torch.cuda.empty_cache()
        cfg = model_cfg(name)
        cfg.nsa.backend = prefill_backend
        torch.manual_seed(0)
        model = cast_model(Transformer(cfg).cuda(), torch.bfloat16).eval()
        T = args.model_context - args.new_tokens
        prompt = torch.randint(0, 256, (1, T), device="cuda")
        t0 = time.perf_counter()
        try:
            _, st = generate(model, prompt, args.new_tokens, greedy=True, compile=mode == "compile",
                             cuda_graph=mode == "cuda_graph")
        except Exception as e:  # one failed mode is reported; the others still run
            print(f"model {name} ({mode}) failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        rows.append(dict(part="model", attention=name, context=args.model_context, new_tokens=args.new_tokens,
                         mode=mode, prefill_backend=prefill_backend, tokens_per_s=st["tokens_per_s"],
                         ms_per_token=1e3 / st["tokens_per_s"], prefill_ms=st["prefill_ms"],
                         setup_ms=st["setup_ms"], peak_mem_gib=st["peak_mem_bytes"] / 2**30,
                         params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                         wall_s=time.perf_counter() - t0))
        r = rows[-1]
        print(f"model {name}: {r['tokens_per_s']:.1f} tokens/s ({r['ms_per_token']:.3f} ms/token, {mode}), "
              f"prefill {r['prefill_ms']:.0f} ms ({prefill_backend}), peak {r['peak_mem_gib']:.2f} GiB", flush=True)
        del model


def table(rows, env):
    lines = [f"Decode benchmark, {env}", ""]
    att = [r for r in rows if r["part"] == "attention"]
    if att:
        lines += ["CUDA-graph replay (GPU time); eager = launched from Python each call (host-bound when small).", "",
                  "| batch | context | NSA decode ms | dense SDPA ms | dense/NSA | eager NSA / dense ms | NSA GB/s "
                  "| dense GB/s | NSA bytes / dense | indices = reference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['context']} | {r['nsa_ms']:.4f} | {r['dense_ms']:.4f} | {r['speedup']:.2f}x | "
                  f"{r['nsa_eager_ms']:.4f} / {r['dense_eager_ms']:.4f} | "
                  f"{r['nsa_gbps']:.0f} | {r['dense_gbps']:.0f} | {r['bytes_ratio']:.3f} | "
                  f"{r['indices_match_reference']} |" for r in att]
        lines.append("")
    mod = [r for r in rows if r["part"] == "model"]
    if mod:
        lines += ["| model | context | step | tokens/s (batch 1) | ms/token | prefill ms | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['attention']} ({r['params_m']:.1f}M) | {r['context']} | {r['mode']} | "
                  f"{r['tokens_per_s']:.1f} | {r['ms_per_token']:.3f} | {r['prefill_ms']:.0f} "
                  f"({r['prefill_backend']}) | {r['peak_mem_gib']:.2f} |" for r in mod]
    return "\n".join(lines)


def main():
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_generate.py needs a CUDA GPU (see --help)", file=sys.stderr)
        return 1
    import triton

    env = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
           f"HQ={args.heads} H={args.kv_heads} D={args.dim_head}, bf16; command: python {' '.join(sys.argv)}")
    rows = []
    if not args.skip_kernel:
        kernel_bench(args, rows)
    if not args.skip_model:
        model_bench(args, rows)
    md = table(rows, env)
    print("\n" + md)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_generate.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(out, "bench_generate.json"), "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
