"""What every Triton kernel module shares: the interpreter switch, the one precision policy for
`tl.dot`, the compressed-visibility rule, and the device's limits (SM count, shared memory, and the
choice of a launch that fits it).

Naming in the kernels (flash-linear-attention's scheme): `i_*` program ids and loop indices, `o_*`
index vectors (offsets), `m_*` masks, `p_*` pointers, `b_*` tiles held in registers; upper-case names
are tl.constexpr.
"""

import functools
import os

import torch
import triton
import triton.language as tl

# The kernels take softmax in base 2 (exp2 is one instruction): exp(x) = exp2(x * LOG2E).
LOG2E = 1.4426950408889634
# The same for @triton.jit code, which reads only constexpr globals; LN2_C turns a log2 back into a log.
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)
LN2_C: tl.constexpr = tl.constexpr(0.6931471805599453)


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype):
    """(PREC, UPCAST) for `dot` on inputs of `dtype`: the one precision policy of every kernel.

    16-bit inputs: tensor-core products with fp32 accumulation (PREC is then ignored). fp32 inputs:
    tf32x3, which keeps about fp32 accuracy on tensor cores (plain tf32 would lose ~3 digits). In the
    interpreter every dot is widened to fp32 and exact (UPCAST): its bf16 x bf16 dot is wrong (Triton
    3.9), and exact fp32 products of bf16 operands are what the tensor cores compute anyway.
    """
    if interpreting():
        return "ieee", True
    return ("tf32x3" if dtype == torch.float32 else "tf32"), False


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation under the policy of `dot_precision`."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def num_visible_blocks(t, BLOCK, STRIDE):
    """Compressed blocks query t sees: block i once its last token i*STRIDE + BLOCK - 1 <= t, so
    max(0, (t + 1 - BLOCK) // STRIDE + 1) (docs/SPEC.md section 1). max(., 0) before the division:
    Triton's integer division truncates, floor is needed, and both agree on non-negative values."""
    return tl.maximum(t + (STRIDE - BLOCK + 1), 0) // STRIDE


@functools.cache
def num_sms(device_index):
    """Streaming multiprocessors of CUDA device `device_index` (the interpreter: 4)."""
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def max_shared_mem(device_index):
    """Bytes of shared memory one program may use on CUDA device `device_index` (the opt-in maximum):
    227 KiB on an H100, 163 KiB on an A100, 99 KiB on sm_86 / sm_89 cards."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


_FITTING = {}


def fitting(kernel, args, candidates, device_index, key):
    """The first of `candidates` (keyword arguments of `kernel[grid](*args, **candidate)`: constexprs,
    num_warps, num_stages; the fastest first) whose compiled kernel fits the device's shared memory.
    Each is compiled by `kernel.warmup`, the compile its launch does anyway, so where the first fits
    (an H100, for every launch of this package) the launch is the first; a card with less shared
    memory gets fewer stages or smaller tiles instead of a launch error. The choice is cached under
    (kernel, device, `key`), where `key` holds what the candidates and the argument dtypes depend on.
    The interpreter has no limit: the first candidate."""
    if interpreting():
        return candidates[0]
    cache_key = (kernel, device_index, key)
    if cache_key not in _FITTING:
        limit = max_shared_mem(device_index)
        _FITTING[cache_key] = next(
            (c for c in candidates[:-1] if kernel.warmup(*args, grid=(1,), **c).metadata.shared <= limit),
            candidates[-1])
    return _FITTING[cache_key]
