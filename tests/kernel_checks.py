"""Helpers shared by the kernel tests: output comparison, and compiling launches for sm_90 without a GPU."""

import torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def assert_close(got, want, dtype, what):
    """Max error relative to the reference's largest value (at least 1), within the dtype's tolerance;
    any NaN (an element the kernel never wrote, with NaN-poisoned outputs) fails."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not got.isnan().any(), f"{what}: NaN (unwritten or invalid) elements"
    if want.numel() == 0:
        return
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {TOL[dtype]}"


# Run in a fresh process without TRITON_INTERPRET: records every `kernel[grid](...)` launch that CALL
# makes (the kernels listed in KERNELS of MODULE are swapped for recorders, so nothing runs), then
# compiles each recorded launch for an H100 (sm_90) with the installed Triton, with the launch's own
# constexprs, scalar and pointer types.
_AOT = r"""
import importlib, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module(MODULE)
calls = []

class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kw: calls.append((self.fn, args, kw))

for name in KERNELS:
    setattr(mod, name, Recorder(getattr(mod, name)))
# Launch choices that ask the device: answer as an H100 would (every nsa module's own binding too).
import sys
for m in [m for name, m in sys.modules.items() if name.startswith("nsa.")]:
    for attr in ("num_sms", "_num_sms"):
        if hasattr(m, attr):
            setattr(m, attr, lambda index=0: 132)
torch.cuda.current_device = lambda: 0
exec(CALL)
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
       torch.int64: "*i64"}
for fn, args, kw in calls:
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
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kw, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    assert k.asm["cubin"], fn.__name__
print("compiled", len(calls))
"""


def compile_launches_for_sm90(module, kernels, call):
    """Compile, for sm_90 and with no GPU, every launch of `kernels` (names in `module`) that the code
    `call` makes (it runs on CPU tensors, with `torch` and the module as `mod` in scope). The
    interpreter never runs Triton's compiler, so this catches what only the compiler rejects, with the
    installed Triton (CI's is newer than the GPU machine's). Returns the number of launches compiled."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    script = f"MODULE = {module!r}\nKERNELS = {list(kernels)!r}\nCALL = {call!r}\n" + _AOT
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
    return int(r.stdout.split()[-1])
