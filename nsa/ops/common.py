"""Small shape helpers shared by the references, the kernels and the model."""


def ceil_div(a, b):
    return -(-a // b)


def num_compressed_blocks(T, block, stride):
    """N_c = max(0, floor((T - block) / stride) + 1): compressed block i covers [i*stride, i*stride + block)."""
    return max(0, (T - block) // stride + 1)
