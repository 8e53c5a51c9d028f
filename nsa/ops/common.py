"""Small shape helpers and the one parameter object shared by the references, the kernels and the model."""

from dataclasses import dataclass


def ceil_div(a, b):
    return -(-a // b)


def num_compressed_blocks(T, block, stride):
    """N_c = max(0, floor((T - block) / stride) + 1): compressed block i covers [i*stride, i*stride + block)."""
    return max(0, (T - block) // stride + 1)


def completes_block(pos, block, stride):
    """Whether the token at position pos (an int, or an int64 tensor elementwise) is the last of a
    compressed block: pos + 1 >= block and (pos + 1 - block) % stride == 0."""
    return (pos + 1 >= block) & ((pos + 1 - block) % stride == 0)


@dataclass(frozen=True)
class NSAParams:
    """The NSA hyperparameters an op reads (docs/SPEC.md section 1), as one frozen, hashable value.

    Every op in `nsa.ops` takes its tensors and then one of these, so the same tuple of integers is not
    threaded through every call; torch.compile treats it as a constant. `scale` None means D ** -0.5.
    Built from the model's `NSAConfig` by `NSAParams.from_config`; a test may build one directly.
    """

    compress_block: int = 32  # l
    compress_stride: int = 16  # d
    sel_block: int = 64  # l'
    num_mem: int = 1  # m
    num_selected: int = 16  # n
    num_initial: int = 1
    num_local: int = 2
    window: int = 512  # w
    shared_selection: bool = True
    causal: bool = True
    scale: float | None = None

    @classmethod
    def from_config(cls, nsa, scale=None):
        """From an `nsa.config.NSAConfig` (any object with the same field names)."""
        return cls(nsa.compress_block, nsa.compress_stride, nsa.sel_block, nsa.num_mem, nsa.num_selected,
                   nsa.num_initial, nsa.num_local, nsa.window, nsa.shared_selection, nsa.causal, scale)

    def scale_for(self, dim_head):
        return dim_head**-0.5 if self.scale is None else self.scale
