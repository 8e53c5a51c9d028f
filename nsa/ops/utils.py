"""What every Triton kernel module shares: the interpreter switch, the one precision policy for
`tl.dot`, the compressed-visibility rule, and the device's limits.

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
