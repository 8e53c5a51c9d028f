"""Preallocated decoding caches: static shapes, filled in place, never grown by concatenation.

One `ModelCache` per generation holds one layer cache per block and the per-sequence lengths
`lengths` [B] (int64, on the device): the number of tokens already in the cache, which is also the
position of the next token. Nothing here reads a tensor value on the host, so a decode step that
appends to these caches can be captured in a CUDA graph.

`SparseCache` (one NSA layer), for kv heads H and head dim D, capacity S = prompt + new tokens:
- k_slc, v_slc [B, S, H, D]: the selection branch's rotated keys and values of every position
  (selection may pick any block, so all are kept).
- k_win, v_win: the window branch's. Without `separate_kv` the window uses the selection branch's
  keys, so these are the same tensors. With it they are a ring of W = min(window, S) rows, position p
  in slot p % W: the window never looks further back than `window` tokens.
- ck, cv [B, num_mem + N_max, H, D]: the memory rows, then compressed block i at row num_mem + i,
  N_max = the blocks that fit in S. Rows of blocks not yet complete hold zeros and are never read.
- k_cmp, v_cmp [B, l, H, D]: a ring of the compression branch's last l unrotated keys and values
  (position p in slot p % l), which is all the next compressed block needs. A block is appended
  exactly when the token t just written completes one: t + 1 >= l and (t + 1 - l) % d == 0.

`DenseCache`: k, v [B, S, H, D] rotated keys and values.
"""

import torch

from nsa.ops.common import num_compressed_blocks


class SparseCache:
    def __init__(self, attn, batch, max_len, device, dtype):
        c = attn.cfg
        H, D = attn.kv_heads, attn.dim_head
        self.block, self.stride, self.num_mem = c.compress_block, c.compress_stride, c.num_mem
        self.max_len = max_len
        self.num_blocks = num_compressed_blocks(max_len, c.compress_block, c.compress_stride)
        kw = dict(device=device, dtype=dtype)
        self.k_slc = torch.zeros(batch, max_len, H, D, **kw)
        self.v_slc = torch.zeros(batch, max_len, H, D, **kw)
        if attn.kv_sets == 1:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            W = min(c.window, max_len)
            self.k_win = torch.zeros(batch, W, H, D, **kw)
            self.v_win = torch.zeros(batch, W, H, D, **kw)
        self.ck = torch.zeros(batch, self.num_mem + self.num_blocks, H, D, **kw)
        self.cv = torch.zeros(batch, self.num_mem + self.num_blocks, H, D, **kw)
        self.k_cmp = torch.zeros(batch, self.block, H, D, **kw)
        self.v_cmp = torch.zeros(batch, self.block, H, D, **kw)
        self.shared_window = attn.kv_sets == 1

    def fill(self, ck, cv, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win):
        """Prefill: tensors of a T-token prompt (ck, cv with their memory rows), positions 0..T-1."""
        T = k_slc.shape[1]
        self.k_slc[:, :T] = k_slc
        self.v_slc[:, :T] = v_slc
        if not self.shared_window:
            _ring_fill(self.k_win, k_win)
            _ring_fill(self.v_win, v_win)
        n = ck.shape[1]
        self.ck[:, :n] = ck
        self.cv[:, :n] = cv
        _ring_fill(self.k_cmp, k_cmp)
        _ring_fill(self.v_cmp, v_cmp)

    def append(self, pos, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, k_compress, v_compress):
        """Write the token at positions pos [B] (int64; tensors [B, 1, H, D]) and, where it completes
        a compressed block, that block (compressed by `k_compress` / `v_compress`). No host sync."""
        _write_rows(self.k_slc, pos, k_slc)
        _write_rows(self.v_slc, pos, v_slc)
        if not self.shared_window:
            W = self.k_win.shape[1]
            _write_rows(self.k_win, pos % W, k_win)
            _write_rows(self.v_win, pos % W, v_win)
        l, d = self.block, self.stride
        _write_rows(self.k_cmp, pos % l, k_cmp)
        _write_rows(self.v_cmp, pos % l, v_cmp)
        if self.num_blocks == 0:
            return
        # The block ending at pos covers positions pos - l + 1 .. pos: gather them from the ring in
        # order, compress, and write the row only where the block really completed (a where, not an if).
        order = (pos[:, None] - l + 1 + torch.arange(l, device=pos.device)) % l  # [B, l]
        done = (pos + 1 >= l) & ((pos + 1 - l) % d == 0)
        row = self.num_mem + ((pos + 1 - l) // d).clamp(0, self.num_blocks - 1)
        for ring, net, dst in ((self.k_cmp, k_compress, self.ck), (self.v_cmp, v_compress, self.cv)):
            window = _gather_rows(ring, order)  # [B, l, H, D]
            new = net.compress_windows(window.transpose(1, 2)[:, None])[:, 0]  # [B, H, D]
            old = _gather_rows(dst, row[:, None])[:, 0]
            _write_rows(dst, row, torch.where(done[:, None, None], new.to(dst.dtype), old)[:, None])

    def tensors(self):
        """What the decode op reads: (ck, cv, k_slc, v_slc, k_win, v_win)."""
        return self.ck, self.cv, self.k_slc, self.v_slc, self.k_win, self.v_win


class DenseCache:
    def __init__(self, attn, batch, max_len, device, dtype):
        H, D = attn.kv_heads, attn.dim_head
        self.max_len = max_len
        self.k = torch.zeros(batch, max_len, H, D, device=device, dtype=dtype)
        self.v = torch.zeros(batch, max_len, H, D, device=device, dtype=dtype)

    def fill(self, k, v):
        T = k.shape[1]
        self.k[:, :T] = k
        self.v[:, :T] = v

    def append(self, pos, k, v):
        _write_rows(self.k, pos, k)
        _write_rows(self.v, pos, v)


class ModelCache:
    """The caches of every block of a `Transformer`, plus `lengths` [B] (tokens so far, int64)."""

    def __init__(self, model, batch, max_len, device=None, dtype=None):
        p = next(model.parameters())
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        self.batch, self.max_len = batch, max_len
        self.layers = []
        for block in model.blocks:
            kind = SparseCache if hasattr(block.attn, "k_compress") else DenseCache
            self.layers.append(kind(block.attn, batch, max_len, device, dtype))
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def reset(self):
        self.lengths.zero_()

    def nbytes(self):
        seen, total = set(), 0
        for layer in self.layers:
            for t in vars(layer).values():
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


def _ring_fill(ring, x):
    """Write x [B, T, ...] (positions 0..T-1) into ring [B, R, ...], position p in slot p % R."""
    T, R = x.shape[1], ring.shape[1]
    start = max(0, T - R)
    slots = torch.arange(start, T, device=x.device) % R
    ring[:, slots] = x[:, start:]


def _write_rows(dst, rows, x):
    """dst[b, rows[b]] = x[b, 0] for every b: dst [B, S, ...], rows [B] int64, x [B, 1, ...]. An
    index_put, which torch.compile writes in place; a scatter_ into a graph input it would
    functionalise into a copy of the whole cache and back, every step."""
    dst[torch.arange(dst.shape[0], device=dst.device), rows] = x[:, 0].to(dst.dtype)


def _gather_rows(src, rows):
    """src [B, S, ...], rows [B, R] int64 -> [B, R, ...]."""
    idx = rows.view(*rows.shape, *([1] * (src.dim() - 2))).expand(-1, -1, *src.shape[2:])
    return src.gather(1, idx)

