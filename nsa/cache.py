"""Preallocated decoding caches: static shapes, filled in place, never grown by concatenation.

The caches hold tensors and write rows; what goes in a row (rotary, the compression of a finished
block) is computed by the attention layers (`nsa.attention`). One `ModelCache` per generation holds
one layer cache per block and the per-sequence lengths `lengths` [B] (int64, on the device): the
number of tokens already in the cache, which is also the position of the next token. Nothing here
reads a tensor value on the host, so a decode step that appends to these caches can be captured in a
CUDA graph. The layout and the append rule are docs/SPEC.md section 1 ("Decoding").

`SparseCache` (one NSA layer), for kv heads H and head dim D, capacity S = prompt + new tokens:
- k_slc, v_slc [B, S, H, D]: the selection branch's rotated keys and values of every position
  (selection may pick any block, so all are kept).
- k_win, v_win: the window branch's. Without `separate_kv` the window uses the selection branch's
  keys, so these are the same tensors. With it they are a ring of W = min(window, S) rows, position p
  in slot p % W: the window never looks further back than `window` tokens.
- ck, cv [B, num_mem + num_blocks, H, D]: the memory rows, then compressed block i at row num_mem + i,
  num_blocks = the blocks that fit in S. Rows of blocks not yet complete hold zeros and are never read.
- k_cmp, v_cmp [B, l, H, D]: a ring of the compression branch's last l unrotated keys and values
  (position p in slot p % l), which is all the next compressed block needs.

`DenseCache`: k, v [B, S, H, D] rotated keys and values.
"""

import torch

from nsa.ops.common import num_compressed_blocks


class SparseCache:
    def __init__(self, nsa, kv_heads, dim_head, batch, max_len, device, dtype):
        """nsa: the layer's `nsa.config.NSAConfig`."""
        shape = (batch, max_len, kv_heads, dim_head)
        kw = dict(device=device, dtype=dtype)
        self.max_len = max_len
        self.num_blocks = num_compressed_blocks(max_len, nsa.compress_block, nsa.compress_stride)
        self.k_slc, self.v_slc = torch.zeros(shape, **kw), torch.zeros(shape, **kw)
        self.shared_window = not nsa.separate_kv
        if self.shared_window:
            self.k_win, self.v_win = self.k_slc, self.v_slc
        else:
            ring = (batch, min(nsa.window, max_len), kv_heads, dim_head)
            self.k_win, self.v_win = torch.zeros(ring, **kw), torch.zeros(ring, **kw)
        rows = (batch, nsa.num_mem + self.num_blocks, kv_heads, dim_head)
        self.ck, self.cv = torch.zeros(rows, **kw), torch.zeros(rows, **kw)
        ring = (batch, nsa.compress_block, kv_heads, dim_head)
        self.k_cmp, self.v_cmp = torch.zeros(ring, **kw), torch.zeros(ring, **kw)

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

    def append(self, pos, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win):
        """Write the token at positions pos [B] (int64; tensors [B, 1, H, D]) into every cache and ring."""
        _write_rows(self.k_slc, pos, k_slc)
        _write_rows(self.v_slc, pos, v_slc)
        if not self.shared_window:
            W = self.k_win.shape[1]
            _write_rows(self.k_win, pos % W, k_win)
            _write_rows(self.v_win, pos % W, v_win)
        l = self.k_cmp.shape[1]
        _write_rows(self.k_cmp, pos % l, k_cmp)
        _write_rows(self.v_cmp, pos % l, v_cmp)

    def compression_ring(self, slots):
        """Rows slots [B, R] (int64) of the compression ring: (keys, values) [B, R, H, D]."""
        return _gather_rows(self.k_cmp, slots), _gather_rows(self.v_cmp, slots)

    def write_compressed(self, rows, ck, cv, where):
        """ck, cv [B, H, D] into rows rows [B] of the compressed caches, only where `where` [B] (bool) is
        true; elsewhere the old row is written back (a select, not a branch: no host sync)."""
        for dst, new in ((self.ck, ck), (self.cv, cv)):
            old = _gather_rows(dst, rows[:, None])[:, 0]
            _write_rows(dst, rows, torch.where(where[:, None, None], new.to(dst.dtype), old)[:, None])

    def tensors(self):
        """What the decode op reads: (ck, cv, k_slc, v_slc, k_win, v_win)."""
        return self.ck, self.cv, self.k_slc, self.v_slc, self.k_win, self.v_win


class DenseCache:
    def __init__(self, kv_heads, dim_head, batch, max_len, device, dtype):
        self.max_len = max_len
        self.k = torch.zeros(batch, max_len, kv_heads, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros(batch, max_len, kv_heads, dim_head, device=device, dtype=dtype)

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
        cfg = model.cfg
        self.batch, self.max_len = batch, max_len
        if cfg.attention == "nsa":
            self.layers = [SparseCache(cfg.nsa, cfg.kv_heads, cfg.dim_head, batch, max_len, device, dtype)
                           for _ in range(cfg.depth)]
        else:
            self.layers = [DenseCache(cfg.kv_heads, cfg.dim_head, batch, max_len, device, dtype)
                           for _ in range(cfg.depth)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)


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
