"""The byte-level Transformer: embedding, pre-norm blocks (attention + feed-forward), norm, LM head."""

import math

import torch.nn.functional as F
from torch import nn

from nsa.attention import DenseAttention, SparseAttention


class FeedForward(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        hidden = int(mult * dim)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.down.weight._residual_out = True  # init scaled down by depth (Transformer._init_weights)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.norm2 = nn.RMSNorm(cfg.dim)
        if cfg.attention == "nsa":
            self.attn = SparseAttention(cfg.dim, cfg.heads, cfg.kv_heads, cfg.dim_head, cfg.nsa, cfg.rotary_base)
        else:
            self.attn = DenseAttention(cfg.dim, cfg.heads, cfg.kv_heads, cfg.dim_head, cfg.rotary_base)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult)

    def forward(self, x, pos=None, cache=None):
        x = x + self.attn(self.norm1(x), pos, cache)
        return x + self.ff(self.norm2(x))

    def decode(self, x, cache, pos, compress=True):
        x = x + self.attn.decode(self.norm1(x), cache, pos, compress)
        return x + self.ff(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed.weight._no_weight_decay = True  # read by train.make_optimizer
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        # GPT-2 style: every linear and embedding weight N(0, 0.02), the residual output projections
        # (marked `_residual_out` where they are made) scaled down by depth so the residual stream's
        # variance does not grow with the number of blocks; weights marked `_own_init` keep theirs.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not getattr(m.weight, "_own_init", False):
                residual = getattr(m.weight, "_residual_out", False)
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * self.cfg.depth) if residual else 0.02)

    def forward(self, idx, targets=None):
        """idx [B, T] bytes -> logits [B, T, vocab]; with targets also the mean loss in nats."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape [batch, time], got {tuple(idx.shape)}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # --- Decoding (nsa/cache.py, nsa/generation.py) ------------------------------------------------

    def prefill(self, idx, cache):
        """Prompt idx [B, T] through the normal forward, filling `cache` (nsa.cache.ModelCache) and
        setting its lengths to T; returns the logits of every position [B, T, vocab]."""
        x = self.embed(idx)
        for block, layer in zip(self.blocks, cache.layers):
            x = block(x, cache=layer)
        cache.lengths.fill_(idx.shape[1])
        return self.head(self.norm(x))

    def decode_step(self, idx, cache, compress=True):
        """One new token per sequence idx [B] at positions cache.lengths -> logits [B, vocab]; advances
        cache.lengths in place. Static shapes and no host synchronisation: CUDA-graph capturable.
        compress=False skips the NSA layers' compression of a finished block, which only a step where
        no sequence's token finishes one may do (`nsa.generation` knows the positions on the host)."""
        pos = cache.lengths
        x = self.embed(idx[:, None])
        for block, layer in zip(self.blocks, cache.layers):
            x = block.decode(x, layer, pos, compress)
        logits = self.head(self.norm(x))[:, 0]
        cache.lengths.add_(1)
        return logits


def bits_per_byte(loss_nats):
    return loss_nats / math.log(2)
