"""Compression networks phi: one block of `block` keys (or values) per kv head -> one vector.

`Compressor` cuts [B, T, H, D] into the overlapping blocks [i*stride, i*stride + block), adds the
learned intra-block position embedding, and applies one of the networks below, each mapping
[B, N, H, block, D] -> [B, N, H, D] with its own weights per kv head.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nsa.ops.common import num_compressed_blocks


def _per_head_linear(heads, fan_in, fan_out):
    w = nn.Parameter(torch.randn(heads, fan_in, fan_out) * fan_in**-0.5)
    b = nn.Parameter(torch.zeros(heads, fan_out))
    return w, b


class MLPCompress(nn.Module):
    """The paper's default: a per-kv-head MLP on the flattened block, block*D -> expand*D -> D."""

    def __init__(self, heads, block, dim_head, expand=1.0):
        super().__init__()
        hidden = max(1, round(expand * dim_head))
        self.w1, self.b1 = _per_head_linear(heads, block * dim_head, hidden)
        self.w2, self.b2 = _per_head_linear(heads, hidden, dim_head)

    def forward(self, x):
        h = torch.einsum("bnhx,hxy->bnhy", x.flatten(-2), self.w1.to(x.dtype)) + self.b1.to(x.dtype)
        return torch.einsum("bnhx,hxy->bnhy", F.gelu(h), self.w2.to(x.dtype)) + self.b2.to(x.dtype)


class MeanCompress(nn.Module):
    """Mean pooling (what fla-core uses); with position embeddings it is a learned weighted sum."""

    def forward(self, x):
        return x.mean(dim=-2)


class ConvCompress(nn.Module):
    """Depthwise convolution over the block (kernel = block, stride = stride), then a per-head linear."""

    def __init__(self, heads, block, dim_head):
        super().__init__()
        self.kernel = nn.Parameter(torch.full((heads, block, dim_head), 1.0 / block))
        self.w, self.b = _per_head_linear(heads, dim_head, dim_head)

    def forward(self, x):
        pooled = (x * self.kernel.to(x.dtype)).sum(dim=-2)
        return torch.einsum("bnhx,hxy->bnhy", pooled, self.w.to(x.dtype)) + self.b.to(x.dtype)


class AttnPoolCompress(nn.Module):
    """Attention pooling: a learned query per kv head scores the block's tokens, softmax, weighted sum."""

    def __init__(self, heads, dim_head):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(heads, dim_head))  # zero: starts as mean pooling

    def forward(self, x):
        scores = torch.einsum("bnhld,hd->bnhl", x, self.query.to(x.dtype)) * x.shape[-1] ** -0.5
        return torch.einsum("bnhl,bnhld->bnhd", scores.softmax(dim=-1), x)


class Compressor(nn.Module):
    def __init__(self, heads, dim_head, block, stride, net="mlp", expand=1.0):
        super().__init__()
        self.block, self.stride = block, stride
        # Zero init: the block's layout already tells the mlp and conv where each token sits.
        self.pos = nn.Parameter(torch.zeros(heads, block, dim_head))
        self.pos._no_weight_decay = True  # read by train.make_optimizer
        if net == "mlp":
            self.net = MLPCompress(heads, block, dim_head, expand)
        elif net == "mean":
            self.net = MeanCompress()
        elif net == "conv":
            self.net = ConvCompress(heads, block, dim_head)
        elif net == "attn":
            self.net = AttnPoolCompress(heads, dim_head)
        else:
            raise ValueError(f"unknown compression network {net!r}: expected mlp, mean, conv or attn")

    def compress_windows(self, windows):
        """[B, N, H, block, D] -> [B, N, H, D]; what decoding calls on the newest block."""
        return self.net(windows + self.pos.to(windows.dtype))

    def forward(self, x):
        """[B, T, H, D] -> [B, N_c, H, D], N_c = num_compressed_blocks(T, block, stride)."""
        B, T, H, D = x.shape
        if num_compressed_blocks(T, self.block, self.stride) == 0:
            return x.new_zeros(B, 0, H, D)
        windows = x.unfold(1, self.block, self.stride).transpose(-1, -2)  # [B, N_c, H, block, D]
        return self.compress_windows(windows)
