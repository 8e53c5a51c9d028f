"""Attention layers: NSA's three gated branches (`SparseAttention`) and the dense baseline.

Both take x [B, T, dim] (already normed) and return [B, T, dim]. The math of each branch lives in
`nsa.ops` (reference, flex or Triton, by backend); this module owns the parameters and the wiring.
"""

import torch
import torch.nn.functional as F
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb
from torch import nn

from nsa.compress import Compressor
from nsa.ops import get_ops
from nsa.ops.common import NSAParams, completes_block
from nsa.ops.reference import select_blocks


def rotate(rotary, x, pos):
    """Rotary embedding of x [B, T, H, D] at integer positions pos [T] or [B, T]."""
    freqs = rotary(pos)
    freqs = freqs[None, :, None] if freqs.ndim == 2 else freqs[:, :, None]
    return apply_rotary_emb(freqs, x)


class SparseAttention(nn.Module):
    """NSA: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win per query head (docs/SPEC.md section 1).

    Branches: compressed attention over blocks of keys compressed by a learned network (plus
    memory keys); selected attention over the top-n selection blocks ranked by the compressed
    branch's attention probabilities; sliding-window attention. Rotary on the last two only.
    """

    def __init__(self, dim, heads, kv_heads, dim_head, nsa, rotary_base=10000.0):
        super().__init__()
        _check_heads(dim, heads, kv_heads, dim_head)
        nsa.validate()  # a module built directly (not through load_config) gets the same checks
        self.dim, self.heads, self.kv_heads, self.dim_head, self.cfg = dim, heads, kv_heads, dim_head, nsa
        self.params = NSAParams.from_config(nsa, dim_head**-0.5)
        # With separate_kv each branch gets its own keys/values (cmp, slc, win); else all share one.
        self.kv_sets = 3 if nsa.separate_kv else 1
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, self.kv_sets * 2 * kv_heads * dim_head, bias=False)
        self.k_compress = Compressor(kv_heads, dim_head, nsa.compress_block, nsa.compress_stride,
                                     nsa.compress_net, nsa.compress_expand)
        self.v_compress = Compressor(kv_heads, dim_head, nsa.compress_block, nsa.compress_stride,
                                     nsa.compress_net, nsa.compress_expand)
        self.mem_kv = nn.Parameter(torch.randn(2, nsa.num_mem, kv_heads, dim_head) * 0.02)
        self.mem_kv._no_weight_decay = True  # read by train.make_optimizer
        # Gates: zero weights and zero bias open every branch at 0.5, so none starts starved of
        # gradient; the network learns the mix (the seed favours the window at init instead).
        self.to_gates = nn.Linear(dim, 3 * heads)
        nn.init.zeros_(self.to_gates.weight)
        nn.init.zeros_(self.to_gates.bias)
        self.to_gates.weight._own_init = True  # Transformer._init_weights leaves it at zero
        self.rotary = RotaryEmbedding(dim_head, theta=rotary_base)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.to_out.weight._residual_out = True  # init scaled down by depth (Transformer._init_weights)

    def project(self, x):
        """x -> q [B, T, HQ, D] and kv_sets pairs (k, v) [B, T, H, D], ordered (cmp, slc, win)."""
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, self.dim_head)
        kv = self.to_kv(x).view(B, T, self.kv_sets, 2, self.kv_heads, self.dim_head)
        # v made contiguous once here: each kernel op taking the strided slice would copy it (4 a layer).
        pairs = [(kv[:, :, i, 0], kv[:, :, i, 1].contiguous()) for i in range(self.kv_sets)]
        return q, pairs * (3 // self.kv_sets)

    def rotate_qk(self, q, k_s, k_w, pos):
        """Rotary on the queries and the selection / window keys (the window's are the selection's
        unless separate_kv)."""
        q_r, k_sr = rotate(self.rotary, q, pos), rotate(self.rotary, k_s, pos)
        return q_r, k_sr, (k_sr if k_w is k_s else rotate(self.rotary, k_w, pos))

    def compressed_kv(self, k, v):
        """Memory keys/values followed by the compressed blocks: [B, num_mem + N_c, H, D]."""
        B = k.shape[0]
        mem_k, mem_v = (m.to(k.dtype).expand(B, -1, -1, -1) for m in self.mem_kv)
        return torch.cat([mem_k, self.k_compress(k)], 1), torch.cat([mem_v, self.v_compress(v)], 1)

    def select(self, ops, q, ck, lse):
        """Top-n block indices [B, T, Hs, n] and, with diff_topk, the straight-through block gates."""
        if not self.cfg.diff_topk:
            with torch.no_grad():
                idx = ops.topn_blocks(q, ck, lse, self.params)
            return idx, None
        imp = ops.block_importance(q, ck, lse.detach(), self.params)
        idx = select_blocks(imp.detach(), self.params)
        picked = imp.gather(-1, idx.long().clamp_min(0))
        return idx, 1.0 + picked - picked.detach()  # forward: exactly 1; backward: d/d importance

    def forward(self, x, pos=None, cache=None):
        """x [B, T, dim] at positions pos (default 0..T-1) -> [B, T, dim]. With `cache` (an
        nsa.cache.SparseCache) this is the prefill: the keys, values and compressed blocks are kept."""
        _check_input(x, self.dim)
        B, T, _ = x.shape
        ops = get_ops(self.cfg.backend, x.device)
        pos = torch.arange(T, device=x.device) if pos is None else pos
        q, ((k_c, v_c), (k_s, v_s), (k_w, v_w)) = self.project(x)

        ck, cv = self.compressed_kv(k_c, v_c)
        o_cmp, lse = ops.compressed_attention(q, ck, cv, self.params)
        idx, block_gate = self.select(ops, q, ck, lse)

        q_r, k_sr, k_wr = self.rotate_qk(q, k_s, k_w, pos)
        o_slc = ops.selection_attention(q_r, k_sr, v_s, idx, self.params, block_gate)
        o_win = ops.sliding_window_attention(q_r, k_wr, v_w, self.params)
        if cache is not None:
            cache.fill(ck, cv, k_c, v_c, k_sr, v_s, k_wr, v_w)

        o = ops.gate_mix(self.to_gates(x), o_cmp, o_slc, o_win)
        return self.to_out(o.reshape(B, T, -1))

    # --- Decoding (nsa/cache.py, nsa/generation.py) ------------------------------------------------

    def decode(self, x, cache, pos, compress=True):
        """One token per sequence: x [B, 1, dim] at positions pos [B] (int64, on x's device) ->
        [B, 1, dim]. Appends the token to `cache` first; no host synchronisation. compress=False skips
        the compression of a finished block: only for a step where no sequence's token finishes one."""
        c = self.cfg
        if not c.causal:
            raise ValueError("decoding needs a causal model (nsa.causal = true)")
        B = x.shape[0]
        q, ((k_c, v_c), (k_s, v_s), (k_w, v_w)) = self.project(x)
        q_r, k_sr, k_wr = self.rotate_qk(q, k_s, k_w, pos[:, None])
        cache.append(pos, k_c, v_c, k_sr, v_s, k_wr, v_w)
        if compress:
            self.append_compressed(cache, pos)
        # The gate projection goes to the decode op, whose kernels compute the gates (no GEMM of its own).
        o = get_ops(c.backend, x.device).decode_attention(q[:, 0], q_r[:, 0], *cache.tensors(), x[:, 0],
                                                          self.to_gates.weight, self.to_gates.bias, pos, self.params)
        return self.to_out(o.reshape(B, 1, -1).to(x.dtype))

    def append_compressed(self, cache, pos):
        """Where the token at pos [B] (already in the cache) completes a compressed block (pos + 1 >= l
        and (pos + 1 - l) % d == 0, docs/SPEC.md section 1), compress the compression ring's last l
        keys and values into that block's row of cache.ck, cache.cv. Every sequence computes a block on
        every step and the cache writes it only where one completed: static shapes, no host sync."""
        num_blocks = cache.ck.shape[1] - self.cfg.num_mem  # a shape, not an int: dynamic under torch.compile
        if num_blocks == 0:
            return
        l, d = self.cfg.compress_block, self.cfg.compress_stride
        slots = (pos[:, None] - l + 1 + torch.arange(l, device=pos.device)) % l  # positions pos - l + 1 .. pos
        k, v = cache.compression_ring(slots)  # [B, l, H, D]
        ck = self.k_compress.compress_windows(k.transpose(1, 2)[:, None])[:, 0]  # [B, H, D]
        cv = self.v_compress.compress_windows(v.transpose(1, 2)[:, None])[:, 0]
        done = completes_block(pos, l, d)
        rows = self.cfg.num_mem + ((pos + 1 - l) // d).clamp(0, num_blocks - 1)
        cache.write_compressed(rows, ck, cv, done)


def _check_heads(dim, heads, kv_heads, dim_head):
    if min(dim, heads, kv_heads, dim_head) < 1:
        raise ValueError(f"dim, heads, kv_heads and dim_head must be positive; got {dim}, {heads}, {kv_heads}, "
                         f"{dim_head}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")


def _check_input(x, dim):
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"attention input must be [batch, time, {dim}], got {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"attention input has no tokens: shape {list(x.shape)} (batch and time must be >= 1)")


class DenseAttention(nn.Module):
    """Causal grouped-query attention through SDPA (cuDNN / flash on GPU): the dense baseline."""

    def __init__(self, dim, heads, kv_heads, dim_head, rotary_base=10000.0):
        super().__init__()
        _check_heads(dim, heads, kv_heads, dim_head)
        self.dim, self.heads, self.kv_heads, self.dim_head = dim, heads, kv_heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * dim_head, bias=False)
        self.rotary = RotaryEmbedding(dim_head, theta=rotary_base)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.to_out.weight._residual_out = True  # init scaled down by depth (Transformer._init_weights)

    def forward(self, x, pos=None, cache=None):
        """x [B, T, dim] -> [B, T, dim]; with `cache` (nsa.cache.DenseCache) also keeps the keys/values."""
        _check_input(x, self.dim)
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device) if pos is None else pos
        q = rotate(self.rotary, self.to_q(x).view(B, T, self.heads, self.dim_head), pos)
        k, v = self.to_kv(x).view(B, T, 2, self.kv_heads, self.dim_head).unbind(2)
        k = rotate(self.rotary, k, pos)
        if cache is not None:
            cache.fill(k, v)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.heads != self.kv_heads)
        return self.to_out(o.transpose(1, 2).reshape(B, T, -1))

    # --- Decoding (nsa/cache.py, nsa/generation.py) ------------------------------------------------

    def decode(self, x, cache, pos, compress=True):
        """One token per sequence x [B, 1, dim] at positions pos [B]: SDPA over the whole static cache
        with a length mask (static shapes, no host synchronisation). compress: unused (no compression)."""
        B = x.shape[0]
        p = pos[:, None]
        q = rotate(self.rotary, self.to_q(x).view(B, 1, self.heads, self.dim_head), p)
        k, v = self.to_kv(x).view(B, 1, 2, self.kv_heads, self.dim_head).unbind(2)
        cache.append(pos, rotate(self.rotary, k, p), v)
        mask = (torch.arange(cache.k.shape[1], device=x.device)[None, :] <= p)[:, None, None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k.transpose(1, 2), cache.v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return self.to_out(o.transpose(1, 2).reshape(B, 1, -1))
