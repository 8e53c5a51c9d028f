"""Registers, spills, shared memory and SASS instruction counts of the training kernels' launches,
compiled ahead of time for a GPU architecture with no GPU (the installed Triton's compiler, the launches
the code makes at a shape).

Where a kernel spills registers to local memory its inner loop waits on it, and what a change adds to
its inner loop shows in its instruction counts (all, special-function, tensor-core); this shows both on
any machine, from the same launches the code would make on the card (the launchers are answered as the
architecture would answer them). Default shape: the enwik8 configs' layer (T = 8192, HQ = 8, H = 1,
D = 64, bf16). Selection launches do not depend on T beyond the grid, so they are recorded at T = 1024.

    python scripts/kernel_resources.py
    python scripts/kernel_resources.py --heads 8 2 --arch 80
    python scripts/kernel_resources.py --decode 16 --T 65536 --heads 64 4 --D 128   # the decode step
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the launchers ask of the device, per target: SMs, and the shared memory one program may use
# (H100 / A100 / RTX 3090-class sm_86 / RTX 4090-class sm_89).
ARCHS = {90: (132, 232448), 80: (108, 166912), 86: (82, 101376), 89: (128, 101376)}

# Run in a fresh process without TRITON_INTERPRET: records every `kernel[grid](...)` launch that CALL
# makes (the kernels listed in KERNELS of MODULE are swapped for recorders, so nothing runs), then
# compiles each recorded launch for ARCH with the installed Triton, with the launch's own constexprs,
# scalar and pointer types, and checks that it fits ARCH's shared memory. A recorder's `warmup` (how
# the launchers try a candidate launch against the device's shared memory) compiles for ARCH too.
_AOT = r"""
import importlib, json, os, re, subprocess, sys, tempfile, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module(MODULE)
calls = []
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
       torch.int64: "*i64"}
compiled = {}


def compile_for_arch(fn, args, kw):
    kw = dict(kw)
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in kw:
            sig[a] = "constexpr"
            continue
        v = args[i]
        if isinstance(v, torch.Tensor):  # 16-byte aligned, as the runtime specialises torch allocations
            sig[a] = PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "fp32" if isinstance(v, float) else "i64" if abs(v) >= 2**31 else "i32"
    key = (fn.__name__, repr(sig), repr(sorted(kw.items())), repr(sorted(opts.items())))
    if key not in compiled:
        compiled[key] = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kw, attrs=attrs),
                                       target=GPUTarget("cuda", ARCH, 32), options=opts)
    return compiled[key]


class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kw: calls.append((self.fn, args, kw))

    def warmup(self, *args, grid, **kw):
        return compile_for_arch(self.fn, args, kw)


for name in KERNELS:
    setattr(mod, name, Recorder(getattr(mod, name)))
# Launch choices that ask the device: answer as ARCH would (every nsa module's own binding too).
for m in [m for name, m in sys.modules.items() if name.startswith("nsa.")]:
    for attr, value in (("num_sms", SMS), ("_num_sms", SMS), ("max_shared_mem", SHARED)):
        if hasattr(m, attr):
            setattr(m, attr, lambda index=0, value=value: value)
torch.cuda.current_device = lambda: 0
exec(CALL)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# Registers, stack bytes and spill instructions (STL / LDL in the SASS) of a compiled kernel, and its
# SASS instructions, special-function ones (MUFU: exp2, log2, reciprocal) and tensor-core ones (HMMA /
# HGMMA): what a change adds to a kernel shows there before any GPU times it. From cuobjdump (shipped
# with Triton's NVIDIA backend); None where it is missing.
def resources(k):
    if not os.path.exists(CUOBJDUMP):
        return dict(regs=None, stack=None, stl=None, ldl=None, sass=None, mufu=None, mma=None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    ins = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*)$", sass, re.M)
    return dict(regs=int(regs.group(1)) if regs else None, stack=int(stack.group(1)) if stack else None,
                stl=len(re.findall(r"\bSTL", sass)), ldl=len(re.findall(r"\bLDL", sass)), sass=len(ins),
                mufu=sum("MUFU" in i for i in ins), mma=sum(bool(re.search(r"\bH(G)?MMA", i)) for i in ins))


seen = set()
for fn, args, kw in calls:
    k = compile_for_arch(fn, args, kw)
    assert k.asm["cubin"], fn.__name__
    assert k.metadata.shared <= SHARED, f"{fn.__name__} {kw}: {k.metadata.shared} bytes of shared memory > {SHARED}"
    launch = {a: b for a, b in sorted(kw.items()) if a.isupper() or a in ("num_warps", "num_stages")}
    key = (fn.__name__, repr(launch))
    if REPORT and key not in seen:
        seen.add(key)
        print("RESOURCES", json.dumps(dict(kernel=fn.__name__, launch=launch, shared=k.metadata.shared, **resources(k)),
                                      default=str))
print("compiled", len(calls))
"""


def _run(module, kernels, call, arch, report):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    sms, shared = ARCHS[arch]
    script = (f"MODULE = {module!r}\nKERNELS = {list(kernels)!r}\nCALL = {call!r}\nARCH = {arch}\nSMS = {sms}\n"
              f"SHARED = {shared}\nREPORT = {report}\n" + _AOT)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or "compiled" not in r.stdout:
        raise RuntimeError(f"compiling {module}'s launches for sm_{arch} failed:\n{r.stderr[-4000:]}")
    return r.stdout


def compile_launches(module, kernels, call, arch=90):
    """Compile, for GPU architecture `arch` (90: H100 / H200, 80: A100, 86 / 89: consumer cards) and with
    no GPU, every launch of `kernels` (names in `module`) that the code `call` makes (it runs on CPU
    tensors, with `torch` and the module as `mod` in scope), and check that each fits the shared memory.
    The interpreter never runs Triton's compiler, so this catches what only the compiler rejects, with
    the installed Triton. Returns the number of launches compiled."""
    return int(_run(module, kernels, call, arch, False).split()[-1])


def launch_resources(module, kernels, call, arch=90):
    """As `compile_launches`, but returns one dict per distinct launch: kernel, launch (constexprs,
    warps, stages), shared (bytes), regs, stack (bytes), stl / ldl (spill stores / loads in the SASS), sass /
    mufu / mma (SASS instructions: all, special-function, tensor-core)."""
    out = _run(module, kernels, call, arch, True)
    return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("RESOURCES ")]


MODEL_CALLS = {
    "nsa.ops.range_attention": (["_range_fwd_kernel", "_range_dq_kernel", "_range_dkdv_kernel",
                                 "_range_sum_splits_kernel"], """
from nsa.ops.common import NSAParams, num_compressed_blocks
from nsa.ops.compressed import compressed_attention
from nsa.ops.window import sliding_window_attention
p = NSAParams()
x = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16, requires_grad=True)
q, k, v = x(1, T, HQ, D), x(1, T, H, D), x(1, T, H, D)
nc = p.num_mem + num_compressed_blocks(T, p.compress_block, p.compress_stride)
ck, cv = x(1, nc, H, D), x(1, nc, H, D)
compressed_attention(q, ck, cv, p)[0].sum().backward()
sliding_window_attention(q, k, v, p).sum().backward()
"""),
    "nsa.ops.selection": (["_sel_fwd_kernel", "_sel_dq_kernel", "_sel_dkv_kernel", "_sel_dkv_reduce_kernel",
                           "_tile_union_kernel", "_dkv_count_kernel", "_dkv_scan_kernel", "_dkv_place_kernel"], """
from nsa.ops.common import NSAParams
from nsa.ops.selection import selection_attention
t, n = 1024, 16
x = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16, requires_grad=True)
q, k, v = x(1, t, HQ, D), x(1, t, H, D), x(1, t, H, D)
cur = torch.arange(t).view(1, t, 1, 1) // 64
idx = (cur - torch.arange(n).view(1, 1, 1, n)).expand(1, t, H, n).to(torch.int32)
idx = torch.where(idx >= 0, idx, 2**30).sort(-1).values
idx = torch.where(idx == 2**30, -1, idx)
selection_attention(q, k, v, idx, NSAParams()).sum().backward()
"""),
    "nsa.ops.topn": (["_topn_kernel"], """
from nsa.ops.common import NSAParams, num_compressed_blocks
p = NSAParams()
nc = p.num_mem + num_compressed_blocks(T, p.compress_block, p.compress_stride)
q, ck = torch.zeros(1, T, HQ, D, dtype=torch.bfloat16), torch.zeros(1, nc, H, D, dtype=torch.bfloat16)
mod.topn_blocks(q, ck, torch.zeros(1, T, HQ), p)
"""),
    "nsa.ops.gates": (["_gate_mix_fwd_kernel", "_gate_mix_bwd_kernel"], """
x = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16, requires_grad=True)
mod.gate_mix(x(1, T, 3 * HQ), x(1, T, HQ, D), x(1, T, HQ, D), x(1, T, HQ, D)).sum().backward()
"""),
}

# The decode step (`--decode BATCH`): its four kernels for BATCH sequences at cache length T, the gate's
# input HQ * D features wide (as `scripts/bench_generate.py` times it).
DECODE_CALLS = {"nsa.ops.decode": (["_partials_kernel", "_importance_kernel", "_select_kernel", "_combine_kernel"], """
from nsa.ops.common import NSAParams, num_compressed_blocks
p = NSAParams()
nc = p.num_mem + num_compressed_blocks(T, p.compress_block, p.compress_stride)
z = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)
q, k, kw = z(BATCH, HQ, D), z(BATCH, T, H, D), z(BATCH, p.window, H, D)
mod._decode_launch(q, q, z(BATCH, nc, H, D), z(BATCH, nc, H, D), k, k, kw, kw, z(BATCH, HQ * D), z(3 * HQ, HQ * D),
                   z(3 * HQ), torch.full((BATCH,), T - 1, dtype=torch.int32), p.compress_block, p.compress_stride,
                   p.sel_block, p.num_mem, p.num_selected, p.num_initial, p.num_local, p.window, True, D**-0.5)
""")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--heads", type=int, nargs=2, default=[8, 1], metavar=("HQ", "H"))
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS))
    p.add_argument("--decode", type=int, metavar="BATCH",
                   help="the decode step's kernels for BATCH sequences at cache length T instead")
    args = p.parse_args()
    HQ, H = args.heads
    if args.T < 32 or HQ % H or HQ // H > 64 or args.D < 1:
        sys.exit(f"need T >= 32, HQ a multiple of H with HQ / H <= 64, D >= 1; got T={args.T}, HQ={HQ}, H={H}, "
                 f"D={args.D}")
    if args.decode is not None and args.decode < 1:
        sys.exit(f"--decode: the batch must be >= 1, got {args.decode}")
    import triton

    step = "the training kernels" if args.decode is None else f"the decode step at batch {args.decode}"
    print(f"sm_{args.arch}, Triton {triton.__version__}, T={args.T} HQ={HQ} H={H} D={args.D}, bf16, "
          f"the enwik8 configs' NSA parameters, {step}\n")
    print("| kernel | launch | registers | stack bytes | spill stores / loads | shared KiB | SASS / MUFU / MMA |")
    print("|---|---|---|---|---|---|---|")
    for module, (kernels, body) in (MODEL_CALLS if args.decode is None else DECODE_CALLS).items():
        call = f"T, HQ, H, D, BATCH = {args.T}, {HQ}, {H}, {args.D}, {args.decode}\n" + body
        for r in launch_resources(module, kernels, call, args.arch):
            launch = ", ".join(f"{k}={v}" for k, v in r["launch"].items()
                               if k.startswith(("BLOCK", "num_", "SPLIT", "WALK", "BJ")))
            print(f"| {r['kernel']} | {launch} | {r['regs']} | {r['stack']} | {r['stl']} / {r['ldl']} | "
                  f"{r['shared'] / 1024:.0f} | {r['sass']} / {r['mufu']} / {r['mma']} |", flush=True)


if __name__ == "__main__":
    main()
