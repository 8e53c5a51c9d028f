"""Selected-block attention kernels on GPU: our Triton kernel vs fla-core's NSA vs dense SDPA.

Median milliseconds (triton.testing.do_bench), bf16, forward and forward+backward, at the shapes of
docs/BENCHMARKS.md, "Benchmark shapes": the paper setting (HQ=64, H=4, D=128, l'=64, n=16) over T,
and small groups (H=4, HQ in 4..64) at one T, reported per query head as well. Block picks are
random and causal and always include the forced blocks (0 and the two local ones). Before timing, a
correctness check against the reference at a moderate size and a determinism check (two backward
runs bit-identical). The paper rows also time the backward's dQ and dK/dV kernels alone, and
flash_nsa's selection kernel (mdy666/Scalable-Flash-Native-Sparse-Attention, `select_attn`) on the
same picks when it imports, from the installed packages or from a folder named by the environment
variable NSA_PEERS that holds flash_nsa/ (e.g. a copy of ../shared/peers in the checkout's .peers/). Prints
markdown tables last; with $OUT set, writes them to $OUT/bench_kernels.md and the raw numbers to
$OUT/bench_kernels.json.

The launch alternatives that lost (docs/KERNELS_SELECTION.md, "Alternatives measured and dropped")
are timed from commit 6ed8f2c, whose `--variants` runs them side by side:
`git checkout 6ed8f2c -- nsa/ops/selection.py scripts/bench_kernels.py`.

    python scripts/bench_kernels.py --T 16384 65536 --small-T 65536 --small-HQ 4 8 16 64   # ~3 min
    python scripts/bench_kernels.py --quick          # T = 8k, 16k; small groups at 16k
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from nsa.ops.common import NSAParams
from peers import import_flash_nsa  # scripts/peers.py: the script's own folder is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAPER = dict(HQ=64, H=4, D=128, sel_block=64, n=16)
DEVICE = "cuda"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                   help="sequence lengths of the paper-setting table")
    p.add_argument("--small-T", type=int, default=65536, help="sequence length of the small-group table")
    p.add_argument("--small-HQ", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                   help="query heads of the small-group table (H = 4)")
    p.add_argument("--check-T", type=int, default=4096, help="sequence length of the reference check")
    p.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baselines")
    p.add_argument("--quick", action="store_true", help="T = 8k, 16k; small groups at 16k; shorter timing")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.small_T = [8192, 16384], 16384
    return args


def random_picks(B, T, Hs, sel_block, n, device, chunk=4096, run=1):
    """[B, T, Hs, n] int32 causal random block picks with the forced blocks, ascending, -1 padded.

    Same rule as reference.select_blocks with random importance, through topk in chunks of tokens
    so that no [T, T / l'] sort is held in memory at 64k. run > 1: each run of `run` tokens shares
    one draw of importance, so neighbours pick mostly the same blocks, as a trained model's do.
    """
    if run < 1 or chunk % run:
        raise ValueError(f"run must be a positive divisor of chunk ({chunk}), got {run}")
    NB = -(-T // sel_block)
    out = torch.empty(B, T, Hs, n, dtype=torch.int32, device=device)
    j = torch.arange(NB, device=device)
    for t0 in range(0, T, chunk):
        t = torch.arange(t0, min(T, t0 + chunk), device=device)[:, None]
        cur = t // sel_block
        valid = j[None] <= cur
        forced = valid & ((j[None] == 0) | ((cur - j[None] >= 0) & (cur - j[None] < 2)))
        score = torch.rand(B, -(-t.shape[0] // run), Hs, NB, device=device).repeat_interleave(run, 1)[:, :t.shape[0]]
        score = score.masked_fill(forced[None, :, None], 2.0).masked_fill(~valid[None, :, None], -1.0)
        top, idx = score.topk(min(n, NB), dim=-1)
        idx = torch.where(top >= 0, idx, NB).sort(dim=-1).values
        idx = torch.where(idx == NB, -1, idx)
        if idx.shape[-1] < n:
            idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)], dim=-1)
        out[:, t0:t0 + t.shape[0]] = idx.to(torch.int32)
    return out


def make_inputs(B, T, HQ, H, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, T, HQ, D, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype, generator=g)
    do = torch.randn(B, T, HQ, D, device=DEVICE, dtype=dtype, generator=g)
    return q, k, v, do


def bench(fn, inputs, do, quick):
    """(fwd ms, fwd+bwd ms), medians; 'oom' / 'err' strings on failure."""
    from triton.testing import do_bench

    rep = 30 if quick else 100
    res = []
    for backward in (False, True):
        try:
            if backward:
                def step():
                    fn(*inputs).backward(do)
                ms = do_bench(step, warmup=10, rep=rep, grad_to_none=list(inputs), return_mode="median")
            else:
                with torch.no_grad():
                    ms = do_bench(lambda: fn(*inputs), warmup=10, rep=rep, return_mode="median")
            res.append(ms)
        except torch.cuda.OutOfMemoryError:
            res.append("oom")
        except Exception as e:  # a baseline that cannot run this shape: report and go on
            print(f"  error: {type(e).__name__}: {str(e)[:200]}")
            res.append("err")
        torch.cuda.empty_cache()
    return res


def ours(indices, sel_block):
    from nsa.ops.selection import selection_attention

    return lambda q, k, v: selection_attention(q, k, v, indices, NSAParams(sel_block=sel_block))


def fla_selection(indices, sel_block):
    """fla-core's parallel_nsa, selection branch only (no compression gate, no window), or None."""
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception:
        return None
    idx = indices.long()

    def fn(q, k, v):
        g = torch.ones(q.shape[:3], device=q.device, dtype=q.dtype)
        return parallel_nsa(q, k, v, g_slc=g, g_swa=g, block_indices=idx, block_counts=idx.shape[-1],
                            block_size=sel_block, window_size=0)

    return fn


def flash_nsa_selection(indices, sel_block):
    """flash_nsa's select_attn on our picks (B = 1, one block set per kv head), or None with one line.
    Its layout is varlen ([T, heads, D], cu_seqlens) with picks [H, T, n], of which it reads the first
    min(n, t // l' + 1) per query: ours, ascending with the -1 padding last, fit as they are."""
    flash_nsa = import_flash_nsa()
    if flash_nsa is None:
        return None
    NSAHelper, select_attn = flash_nsa.NSAHelper, flash_nsa.select_attn
    B, T, H, n = indices.shape
    NSAHelper.set_hyperparameters(block_size=sel_block, top_n=n, num_init_blocks=1, num_local_blocks=2)
    # Outside the timed function: it syncs with the host to read the lengths.
    NSAHelper.init_cu_seqlens(torch.tensor([0, T], dtype=torch.int32, device=indices.device))
    topk = indices[0].permute(1, 0, 2).contiguous()
    return lambda q, k, v: select_attn(q[0], k[0], v[0], topk)[None]


def dense(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def fn(q, k, v):
        # k, v come expanded to HQ heads (see `expand_kv`): not every backend takes enable_gqa.
        with sdpa_kernel(be):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)

    return fn


def expand_kv(q, k, v):
    """Dense baselines' inputs: k, v repeated to q's head count, outside the timed region."""
    G = q.shape[2] // k.shape[2]
    return q, k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)


def leaf(*xs):
    return [x.detach().requires_grad_() for x in xs]


def fmt(x):
    return x if isinstance(x, str) else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def pair(r):
    return "n/a" if r is None else f"{fmt(r[0])} / {fmt(r[1])}"


def correctness(args):
    """Max |kernel - reference| / max |reference| for o, dq, dk, dv, and a determinism flag."""
    from nsa.ops import reference
    from nsa.ops.selection import selection_attention

    rows = []
    T, D, bs, n = args.check_T, 128, 64, 16
    for G, shared in ((16, True), (4, True), (1, True), (8, False)):
        H = 2
        q, k, v, do = make_inputs(1, T, H * G, H, D, seed=G)
        idx = random_picks(1, T, H if shared else H * G, bs, n, DEVICE)
        q1, k1, v1 = leaf(q, k, v)
        o1 = selection_attention(q1, k1, v1, idx, NSAParams(sel_block=bs))
        o1.backward(do)
        got = (o1, q1.grad, k1.grad, v1.grad)
        q2, k2, v2 = leaf(q, k, v)
        o2 = selection_attention(q2, k2, v2, idx, NSAParams(sel_block=bs))
        o2.backward(do)
        same = all(torch.equal(a, b) for a, b in zip(got, (o2, q2.grad, k2.grad, v2.grad)))
        qf, kf, vf = leaf(q.float(), k.float(), v.float())
        of = reference.selection_attention(qf, kf, vf, idx, NSAParams(sel_block=bs))
        of.backward(do.float())
        want = (of, qf.grad, kf.grad, vf.grad)
        errs = [((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(got, want)]
        rows.append(dict(G=G, shared=shared, T=T, rel_err=errs, deterministic=same))
        del qf, kf, vf, of, want
        torch.cuda.empty_cache()
    return rows


def bench_parts(q, k, v, do, idx, sel_block, quick):
    """(dq ms, dkv ms): the backward's two kernels alone (dK/dV including its reverse-index build)."""
    from triton.testing import do_bench

    from nsa.ops import selection

    rep = 30 if quick else 60
    scale = q.shape[-1] ** -0.5
    o, dq = torch.empty_like(q), torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    try:
        selection.selection_fwd(q, k, v, idx, sel_block, scale, o, lse)
        delta = torch.empty_like(lse)
        t_dq = do_bench(lambda: selection.selection_dq(do, q, k, v, o, lse, idx, sel_block, scale, dq, delta),
                        warmup=10, rep=rep, return_mode="median")
        t_dkv = do_bench(lambda: selection.selection_dkv(do, q, k, v, lse, delta, idx, sel_block, scale, dk, dv),
                         warmup=10, rep=rep, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        return ["oom", "oom"]
    finally:
        del o, dq, dk, dv, lse
        torch.cuda.empty_cache()
    return [t_dq, t_dkv]


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    import triton

    B, bs, n, D = 1, PAPER["sel_block"], PAPER["n"], PAPER["D"]
    fla_ok = fla_selection(torch.zeros(1, 1, 1, 1, dtype=torch.int32), bs) is not None
    env = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               fla=_fla_version() if fla_ok else None, command=" ".join(sys.argv))
    print(env, flush=True)
    raw = dict(env=env, check=[], paper=[], small=[])

    raw["check"] = correctness(args)
    for r in raw["check"]:
        print("check", r, flush=True)

    for T in args.T:
        q, k, v, do = make_inputs(B, T, PAPER["HQ"], PAPER["H"], D)
        idx = random_picks(B, T, PAPER["H"], bs, n, DEVICE)
        print(f"paper T={T} ...", flush=True)
        row = dict(T=T, ours=bench(ours(idx, bs), leaf(q, k, v), do, args.quick))
        row["parts"] = bench_parts(q, k, v, do, idx, bs, args.quick)
        fla = fla_selection(idx, bs)
        row["fla"] = bench(fla, leaf(q, k, v), do, args.quick) if fla else None
        peer = flash_nsa_selection(idx, bs)
        row["flash_nsa"] = bench(peer, leaf(q, k, v), do, args.quick) if peer else None
        if not args.no_dense:
            for be in ("cudnn", "flash"):
                row[be] = bench(dense(be), leaf(*expand_kv(q, k, v)), do, args.quick)
        print("paper", row, flush=True)
        raw["paper"].append(row)
        del q, k, v, do, idx
        torch.cuda.empty_cache()

    T, H = args.small_T, 4
    for HQ in args.small_HQ:
        same = [r for r in raw["paper"] if r["T"] == T] if HQ == PAPER["HQ"] else []
        if same:
            # The paper setting at this T: reuse its timings (same inputs, same kernels).
            row = dict(T=T, HQ=HQ, ours=same[0]["ours"], fla=same[0]["fla"])
        else:
            q, k, v, do = make_inputs(B, T, HQ, H, D)
            idx = random_picks(B, T, H, bs, n, DEVICE)
            print(f"small T={T} HQ={HQ} ...", flush=True)
            row = dict(T=T, HQ=HQ, ours=bench(ours(idx, bs), leaf(q, k, v), do, args.quick))
            fla = fla_selection(idx, bs) if HQ // H >= 16 else None
            row["fla"] = bench(fla, leaf(q, k, v), do, args.quick) if fla else None
            del q, k, v, do, idx
            torch.cuda.empty_cache()
        print("small", row, flush=True)
        raw["small"].append(row)

    table = render(raw, args)
    print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_kernels.md").write_text(table)
        (Path(out) / "bench_kernels.json").write_text(json.dumps(raw, indent=1, default=str))


def _fla_version():
    try:
        from importlib.metadata import version

        return version("flash-linear-attention")
    except Exception:
        return "unknown"


def _num(x):
    return x if isinstance(x, (int, float)) else float("inf")


def render(raw, args):
    e = raw["env"]
    lines = [f"{e['card']}, torch {e['torch']}, triton {e['triton']}, fla {e['fla'] or 'n/a'}; `{e['command']}`", "",
             f"Correctness vs reference (bf16, T={args.check_T}, H=2, D=128, l'=64, n=16): max rel error "
             "o / dq / dk / dv; deterministic = two backward runs bit-identical", "",
             "| G | indices | o | dq | dk | dv | deterministic |", "|---|---|---|---|---|---|---|"]
    for r in raw["check"]:
        errs = " | ".join(f"{x:.1e}" for x in r["rel_err"])
        lines.append(f"| {r['G']} | {'shared' if r['shared'] else 'per head'} | {errs} | {r['deterministic']} |")

    lines += ["", "Paper setting (B=1, HQ=64, H=4, D=128, l'=64, n=16), median ms fwd / fwd+bwd; dQ and dK/dV: the "
              "backward's two kernels alone (dK/dV with its reverse index)", "",
              "| T | ours | dQ / dK+dV | fla-core selection | flash_nsa selection | SDPA cuDNN (dense) | "
              "SDPA flash (dense) | ours / fla-core |", "|---|---|---|---|---|---|---|---|"]
    for r in raw["paper"]:
        o, f = r["ours"], r["fla"]
        ratio = f"{_num(o[0]) / _num(f[0]):.2f} / {_num(o[1]) / _num(f[1]):.2f}" if f else "n/a"
        lines.append(f"| {r['T'] // 1024}k | {pair(o)} | {pair(r['parts'])} | {pair(f)} | {pair(r.get('flash_nsa'))} "
                     f"| {pair(r.get('cudnn'))} | {pair(r.get('flash'))} | {ratio} |")

    lines += ["", f"Small groups (B=1, H=4, D=128, T={args.small_T // 1024}k), median ms fwd / fwd+bwd and per "
              "query head", "",
              "| HQ | G | ours | ours per head | fla-core | fla-core per head |",
              "|---|---|---|---|---|---|"]
    for r in raw["small"]:
        lines.append(f"| {r['HQ']} | {r['HQ'] // 4} | {pair(r['ours'])} | {pair(per_head(r['ours'], r['HQ']))} "
                     f"| {pair(r['fla'])} | {pair(per_head(r['fla'], r['HQ']))} |")
    g16 = [r for r in raw["small"] if r["HQ"] // 4 == 16]
    if g16:
        ref = [_num(x) / g16[0]["HQ"] for x in g16[0]["ours"]]
        lines.append("")
        for r in raw["small"]:
            if r["HQ"] // 4 < 16:
                f, b = (_num(x) / r["HQ"] / y for x, y in zip(r["ours"], ref))
                lines.append(f"- G={r['HQ'] // 4}: per-head time / G=16 per-head time = {f:.2f} fwd, "
                             f"{b:.2f} fwd+bwd (target <= 1.5)")
    return "\n".join(lines) + "\n"


def per_head(res, HQ):
    if res is None:
        return None
    return [x if isinstance(x, str) else x / HQ for x in res]


if __name__ == "__main__":
    main()
