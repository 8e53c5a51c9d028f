"""NSA attention-core kernels on GPU, branch by branch and together, vs dense SDPA (cuDNN).

Median milliseconds (triton.testing.do_bench), bf16, forward and forward+backward, at the paper
setting of docs/BENCHMARKS.md, "Benchmark shapes": B=1, HQ=64, H=4, D=128, l/d/l'/n/w =
32/16/64/16/512, one memory key.
Rows per T:
- compressed attention (nsa.ops.compressed) over random compressed keys/values of the right shape;
- top-n selection (nsa.ops.topn), forward only (it has no gradient);
- sliding window: our Triton kernel (nsa.ops.window) vs compiled flex attention with a cached mask;
- the whole attention core, if nsa.ops.selection imports: compressed + top-n + selection + window +
  gate combine (projections, compression MLP and rotary excluded), vs dense causal SDPA cuDNN;
- flash_nsa's whole core (mdy666/Scalable-Flash-Native-Sparse-Attention, `HFNSACore`: its mean-pooling
  compression included) when it imports, from the installed packages or from a folder named by the
  environment variable NSA_PEERS that holds flash_nsa/ (e.g. a copy of ../shared/peers in the
  checkout's .peers/). Its window branch calls flash-attn, which does not install on these machines:
  `flash_nsa.modules.hf_level_nsa.swa_varlen_func` is replaced by our Triton window kernel, so that
  row's window is ours;
with the peak memory of one forward+backward. Before timing, a correctness check of every kernel
against nsa.ops.reference at a moderate size (--check-T). Prints markdown tables last; with $OUT set,
writes them to $OUT/bench_layer.md and the raw numbers to $OUT/bench_layer.json.

    python scripts/bench_layer.py                 # T = 8k..64k, about 5 minutes on an H100
    python scripts/bench_layer.py --quick         # T = 8k, 16k, shorter timing
    python scripts/bench_layer.py --T 8192 32768
    python scripts/bench_layer.py --T 65536 --no-flex --mem-T 131072   # + fla-core, + 128k memory
"""

import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch

from nsa.ops.common import NSAParams
from peers import import_flash_nsa  # scripts/peers.py: the script's own folder is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAPER = dict(HQ=64, H=4, D=128, block=32, stride=16, sel_block=64, n=16, window=512, num_mem=1)
# The same setting as the ops' parameter object (l/d/l'/n/w = 32/16/64/16/512, one memory key).
PARAMS = NSAParams(compress_block=32, compress_stride=16, sel_block=64, num_mem=1, num_selected=16, window=512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536], help="sequence lengths")
    p.add_argument("--check-T", type=int, default=2048, help="sequence length of the reference check (0: skip)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baseline")
    p.add_argument("--no-flex", action="store_true", help="skip the flex-attention window baseline")
    p.add_argument("--quick", action="store_true", help="T = 8k, 16k and shorter timing")
    p.add_argument("--no-fla", action="store_true", help="skip fla-core's compression + selection")
    p.add_argument("--no-peers", action="store_true", help="skip flash_nsa's core")
    p.add_argument("--mem-T", type=int, nargs="*", default=[],
                   help="lengths (e.g. 131072) at which only one fwd+bwd of the core and of dense is run, "
                        "for its peak memory and a single-shot time")
    args = p.parse_args(argv)
    if args.quick and args.T == p.get_default("T"):
        args.T = [8192, 16384]
    return args


# ------------------------------------------------------------------------------------------------
# The functions timed; each takes leaf tensors and returns one output tensor
# ------------------------------------------------------------------------------------------------


def compressed_fn(q, ck, cv):
    from nsa.ops.compressed import compressed_attention

    return compressed_attention(q, ck, cv, PARAMS)[0]


def topn_fn(lse):
    from nsa.ops.topn import topn_blocks

    return lambda q, ck: topn_blocks(q, ck, lse, PARAMS)


def window_fn(q, k, v):
    from nsa.ops.window import sliding_window_attention

    return sliding_window_attention(q, k, v, PARAMS)


def flex_window_fn(T, device):
    """Compiled flex attention with the window's block mask built once, outside the timed region."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    w = PAPER["window"]
    mask = create_block_mask(lambda b, h, t, s: (t - s < w) & (s <= t), None, None, T, T, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        o = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
        return o.transpose(1, 2)

    return fn


def core_fn(ops):
    """The attention core of one NSA layer through `ops` (a namespace with the reference signatures):
    every branch from the same q, k, v (no rotary), random compressed keys, sigmoid gates."""
    def fn(q, k, v, ck, cv, gates):
        o_cmp, lse = ops.compressed_attention(q, ck, cv, PARAMS)
        with torch.no_grad():
            idx = ops.topn_blocks(q, ck, lse, PARAMS)
        o_slc = ops.selection_attention(q, k, v, idx, PARAMS)
        o_win = ops.sliding_window_attention(q, k, v, PARAMS)
        g = gates.sigmoid().unsqueeze(-1)
        return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win

    return fn


def fla_fn():
    """fla-core 0.6's parallel_nsa with the compression and selection gates (its window branch needs
    flash-attn, which the peers' comparison leaves out): mean-pooled compression with l = d = l' = 64,
    its own top-16, selection. None when fla-core is not installed."""
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:
        print(f"fla-core unavailable ({type(e).__name__}: {e}): skipping its row")
        return None

    def fn(q, k, v, gates):
        g = gates.sigmoid()
        return parallel_nsa(q, k, v, g[..., 0], g[..., 1], None, block_counts=PAPER["n"],
                            block_size=PAPER["sel_block"])

    return fn


def flash_nsa_fn():
    """flash_nsa's HFNSACore at the paper setting, its window on our kernel (module docstring), taking
    our [1, T, ...] tensors (it is varlen: [T, ...] and cu_seqlens); None, with one line, when it does
    not import."""
    flash_nsa = import_flash_nsa()
    if flash_nsa is None:
        return None
    from flash_nsa.modules import hf_level_nsa
    from nsa.ops.window import sliding_window_attention

    def swa(q, k, v, sm_scale=None):  # flash_nsa's swa_varlen_func signature: [T, heads, D], one sequence
        p = NSAParams(window=PAPER["window"], scale=sm_scale)
        return sliding_window_attention(q[None], k[None], v[None], p)[0]

    hf_level_nsa.swa_varlen_func = swa
    P = PAPER
    core = flash_nsa.HFNSACore(flash_nsa.NSAConfig(
        head_dim=P["D"], num_heads=P["HQ"], num_kv_heads=P["H"], kernel_size=P["block"], stride=P["stride"],
        block_size=P["sel_block"], top_n=P["n"], num_init_blocks=1, num_local_blocks=2, window_size=P["window"]))

    def fn(q, k, v, gates):
        cu_seqlens = torch.tensor([0, q.shape[1]], dtype=torch.int32, device=q.device)
        return core(q[0], k[0], v[0], gates[0], cu_seqlens)[None]

    return fn


def dense_fn(q, k, v):
    """Causal SDPA, cuDNN backend; k, v come expanded to HQ heads (see `expand_kv`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def triton_ops():
    """Our kernels, or None when the selection kernel is not there yet."""
    try:
        from nsa.ops.selection import selection_attention
    except Exception as e:
        print(f"nsa.ops.selection unavailable ({type(e).__name__}: {e}): skipping the whole-core rows")
        return None
    from nsa.ops.compressed import compressed_attention
    from nsa.ops.topn import topn_blocks
    from nsa.ops.window import sliding_window_attention

    return types.SimpleNamespace(compressed_attention=compressed_attention, topn_blocks=topn_blocks,
                                 selection_attention=selection_attention,
                                 sliding_window_attention=sliding_window_attention)


# ------------------------------------------------------------------------------------------------
# Inputs, timing, memory
# ------------------------------------------------------------------------------------------------


def make_inputs(T, device, dtype=torch.bfloat16, seed=0):
    from nsa.ops.common import num_compressed_blocks

    P = PAPER
    g = torch.Generator(device=device).manual_seed(seed)
    S = P["num_mem"] + num_compressed_blocks(T, P["block"], P["stride"])

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    return dict(q=rnd(1, T, P["HQ"], P["D"]), k=rnd(1, T, P["H"], P["D"]), v=rnd(1, T, P["H"], P["D"]),
                ck=rnd(1, S, P["H"], P["D"]), cv=rnd(1, S, P["H"], P["D"]), gates=rnd(1, T, P["HQ"], 3))


def expand_kv(q, k, v):
    """Dense baseline's inputs: k, v repeated to q's head count, outside the timed region."""
    G = q.shape[2] // k.shape[2]
    return [x.detach().requires_grad_() for x in (q, k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2))]


def bench(fn, inputs, quick, backward=True):
    """{'fwd': ms, 'fwdbwd': ms, 'peak_gib': GiB above the inputs for one fwd(+bwd)}; 'oom'/'err' on failure."""
    from triton.testing import do_bench

    rep = 30 if quick else 100
    res = {}
    for mode in ("fwd", "fwdbwd") if backward else ("fwd",):
        try:
            if mode == "fwd":
                def step():
                    with torch.no_grad():
                        fn(*inputs)
            else:
                do = torch.randn_like(fn(*inputs))

                def step():
                    fn(*inputs).backward(do)
            res[mode] = do_bench(step, warmup=10, rep=rep, grad_to_none=list(inputs), return_mode="median")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            res[f"peak_gib_{mode}"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        except torch.cuda.OutOfMemoryError:
            res[mode] = "oom"
        except Exception as e:  # a baseline that cannot run this shape: report and go on
            print(f"  error: {type(e).__name__}: {str(e)[:300]}")
            res[mode] = "err"
        for x in inputs:
            x.grad = None
        torch.cuda.empty_cache()
    return res


def once(fn, inputs):
    """One fwd+bwd: (seconds, peak GiB above the inputs), or the error's name."""
    import time

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        o = fn(*inputs)
        o.backward(torch.ones_like(o))
        del o
        torch.cuda.synchronize()
        return dict(ms=1e3 * (time.perf_counter() - t0), peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)
    except torch.cuda.OutOfMemoryError:
        return dict(error="oom")
    finally:
        for x in inputs:
            x.grad = None


def memory_row(T, ops, device):
    """Peak memory of one fwd+bwd at a long T (second call: the first compiles), core vs dense."""
    print(f"memory at T={T} ...")
    x = make_inputs(T, device)
    inputs = [x[n] for n in ("q", "k", "v", "ck", "cv", "gates")]
    row = dict(T=T, total_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
               inputs_gib=sum(t.numel() * t.element_size() for t in inputs) / 2**30)
    if ops is not None:
        once(core_fn(ops), inputs)
        row["core"] = once(core_fn(ops), inputs)
    dense_inputs = expand_kv(*inputs[:3])
    row["dense_inputs_gib"] = sum(t.numel() * t.element_size() for t in dense_inputs) / 2**30
    del x, inputs
    once(dense_fn, dense_inputs)
    row["dense_cudnn"] = once(dense_fn, dense_inputs)
    print("  " + json.dumps(row))
    del dense_inputs
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# Correctness against the reference
# ------------------------------------------------------------------------------------------------


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def check_grads(name, fn, ref_fn, inputs, names):
    """Max relative error of the output and of each input's gradient, ours vs the reference."""
    out = {}
    leaves = [x.detach().requires_grad_() for x in inputs]
    ref_leaves = [x.detach().requires_grad_() for x in inputs]
    o, ro = fn(*leaves), ref_fn(*ref_leaves)
    do = torch.randn_like(o)
    out[f"{name} o"] = rel_err(o, ro)
    grads = torch.autograd.grad(o, leaves, do)
    rgrads = torch.autograd.grad(ro, ref_leaves, do)
    for n, g, rg in zip(names, grads, rgrads):
        out[f"{name} d{n}"] = rel_err(g, rg)
    return out


def correctness(T, device):
    from nsa.ops import reference as R
    from nsa.ops.compressed import compressed_attention
    from nsa.ops.topn import topn_blocks

    x = make_inputs(T, device, seed=1)
    q, k, v, ck, cv = (x[n].detach() for n in ("q", "k", "v", "ck", "cv"))
    res = check_grads("compressed", compressed_fn,
                      lambda q, ck, cv: R.compressed_attention(q, ck, cv, PARAMS)[0], (q, ck, cv), "q ck cv".split())
    lse, ref_lse = compressed_attention(q, ck, cv, PARAMS)[1], R.compressed_attention(q, ck, cv, PARAMS)[1]
    res["compressed lse"] = rel_err(lse, ref_lse)
    res.update(check_grads("window", window_fn, lambda q, k, v: R.sliding_window_attention(q, k, v, PARAMS),
                           (q, k, v), "q k v".split()))
    # Top-n from the same lse: rows that differ must be rounding near-ties (importance of the
    # differing picks equal within 1e-4 relative).
    idx, ref_idx = topn_blocks(q, ck, ref_lse, PARAMS), R.topn_blocks(q, ck, ref_lse, PARAMS)
    bad = (idx != ref_idx).any(-1)
    res["topn rows differing"] = bad.float().mean().item()
    if bad.any():
        imp = R.block_importance(q, ck, ref_lse, PARAMS)
        picked = [imp[bad].gather(-1, i[bad].clamp_min(0).long()).where(i[bad] >= 0, 0).sum(-1) for i in (idx, ref_idx)]
        res["topn picked-importance err"] = rel_err(*picked)
    ops = triton_ops()
    if ops is not None:
        # Both cores select with the reference's top-n, so near-tie flips (above) cannot show up here.
        ours = types.SimpleNamespace(**{**vars(ops), "topn_blocks": R.topn_blocks})
        res.update(check_grads("core", core_fn(ours), core_fn(R), (q, k, v, ck, cv, x["gates"].detach()),
                               "q k v ck cv gates".split()))
    return res


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer.py needs a CUDA device")
    import triton

    device = torch.device("cuda")
    P = PAPER
    raw = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               command=" ".join(sys.argv), setting=P, rows=[], check=None)
    print(f"{raw['device']}, torch {raw['torch']}, triton {raw['triton']}")
    if args.check_T:
        print(f"correctness vs reference at T={args.check_T} ...")
        raw["check"] = correctness(args.check_T, device)
        for k, v in raw["check"].items():
            print(f"  {k}: {v:.3g}")
    ops = triton_ops()
    peer = None if args.no_peers else flash_nsa_fn()
    for T in args.T:
        print(f"T={T} ...")
        x = make_inputs(T, device)
        q, k, v, ck, cv, gates = (x[n] for n in ("q", "k", "v", "ck", "cv", "gates"))
        row = dict(T=T)
        row["compressed"] = bench(compressed_fn, [q, ck, cv], args.quick)
        from nsa.ops.compressed import compressed_attention

        with torch.no_grad():
            lse = compressed_attention(q, ck, cv, PARAMS)[1]
        row["topn"] = bench(topn_fn(lse), [q, ck], args.quick, backward=False)
        del lse
        row["window"] = bench(window_fn, [q, k, v], args.quick)
        if not args.no_flex:
            row["flex_window"] = bench(flex_window_fn(T, device), [q, k, v], args.quick)
        if ops is not None:
            row["core"] = bench(core_fn(ops), [q, k, v, ck, cv, gates], args.quick)
        fla = None if args.no_fla else fla_fn()
        if fla is not None:
            row["fla_cmp_slc"] = bench(fla, [q, k, v, gates], args.quick)
        if peer is not None:
            row["flash_nsa_core"] = bench(peer, [q, k, v, gates], args.quick)
        if not args.no_dense:
            row["dense_cudnn"] = bench(dense_fn, expand_kv(q, k, v), args.quick)
        raw["rows"].append(row)
        print("  " + json.dumps(row))
        del x, q, k, v, ck, cv, gates
        torch.cuda.empty_cache()

    raw["memory"] = [memory_row(T, ops, device) for T in args.mem_T]
    md = render(raw)
    print(md)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench_layer.md").write_text(md)
        Path(out, "bench_layer.json").write_text(json.dumps(raw, indent=1))


def fmt(x):
    if x is None:
        return "n/a"
    return x if isinstance(x, str) else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def cell(r, backward=True):
    if r is None:
        return "n/a"
    return f"{fmt(r.get('fwd'))} / {fmt(r.get('fwdbwd'))}" if backward else fmt(r.get("fwd"))


def peak(r):
    if r is None:
        return "n/a"
    p = r.get("peak_gib_fwdbwd")
    return "n/a" if p is None else f"{p:.2f}"


def render(raw):
    P = raw["setting"]
    lines = [f"### NSA attention core, bf16, {raw['device']}, torch {raw['torch']}, triton {raw['triton']}",
             "",
             f"B=1, HQ={P['HQ']}, H={P['H']}, D={P['D']}, l/d/l'/n/w = {P['block']}/{P['stride']}/"
             f"{P['sel_block']}/{P['n']}/{P['window']}, num_mem={P['num_mem']}. Median ms, fwd / fwd+bwd; "
             "peak = GiB allocated above the inputs during one fwd+bwd. Command: `" + raw["command"] + "`",
             "",
             "| T | compressed | top-n (fwd) | window (ours) | window (flex) | core (ours) | fla-core cmp+slc "
             "| flash_nsa core (window: ours) | dense cuDNN | peak core | peak dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in raw["rows"]:
        lines.append(f"| {r['T'] // 1024}k | {cell(r['compressed'])} | {cell(r['topn'], False)} "
                     f"| {cell(r['window'])} | {cell(r.get('flex_window'))} | {cell(r.get('core'))} "
                     f"| {cell(r.get('fla_cmp_slc'))} | {cell(r.get('flash_nsa_core'))} | {cell(r.get('dense_cudnn'))} "
                     f"| {peak(r.get('core'))} | {peak(r.get('dense_cudnn'))} |")
    if any(r.get("flash_nsa_core") for r in raw["rows"]):
        lines += ["", "flash_nsa core: its HFNSACore with its own mean-pooling compression, top-n, selection and gate "
                  "combine; its window branch (flash-attn, which does not install here) replaced by our Triton "
                  "window kernel."]
    if raw.get("memory"):
        lines += ["", "One fwd+bwd at long T (single shot after a warm-up call): ms and peak GiB allocated above "
                  "the inputs (core inputs incl. ck/cv/gates; dense inputs have k, v expanded to HQ heads).", "",
                  "| T | card GiB | core ms | core peak | core inputs | dense ms | dense peak | dense inputs |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in raw["memory"]:
            c, d = m.get("core", {}), m["dense_cudnn"]
            lines.append(f"| {m['T'] // 1024}k | {m['total_gib']:.1f} | {fmt(c.get('ms', c.get('error')))} "
                         f"| {fmt(c.get('peak_gib'))} | {m['inputs_gib']:.2f} | {fmt(d.get('ms', d.get('error')))} "
                         f"| {fmt(d.get('peak_gib'))} | {m['dense_inputs_gib']:.2f} |")
    if raw["check"]:
        lines += ["", "Correctness vs nsa.ops.reference (max error relative to the reference's max |value|; "
                  "top-n: fraction of rows differing, and for those the picked-importance error):", "",
                  "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in raw["check"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
