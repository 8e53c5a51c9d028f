"""Triton selected-block attention (nsa.ops.selection) against the reference.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
small; the `gpu` test repeats the comparison at a larger size on a CUDA device. Errors are measured
against the fp64 reference and held to flash-attention's rule (`kernel_checks.assert_close`).
"""

import pytest
import torch

from kernel_checks import assert_close, reference_runs

from nsa.ops import reference, selection
from nsa.ops.common import NSAParams, ceil_div

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P16 = NSAParams(sel_block=16)


def _indices(B, T, Hs, sel_block, n):
    """Random importance through the reference top-n: forced initial/local blocks, -1 padding."""
    imp = torch.rand(B, T, Hs, ceil_div(T, sel_block), device=DEVICE)
    return reference.select_blocks(imp, NSAParams(sel_block=sel_block, num_selected=n))


def _inputs(B, T, H, G, D, dtype):
    q = torch.randn(B, T, H * G, D, device=DEVICE).to(dtype)
    k = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    v = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    do = torch.randn(B, T, H * G, D, device=DEVICE).to(dtype)
    return q, k, v, do


def _kernel_grads(q, k, v, do, idx, sel_block):
    """Forward + backward into NaN-filled buffers: an element a kernel forgets to write stays NaN."""
    scale = q.shape[-1] ** -0.5
    nan = float("nan")
    o, dq = torch.full_like(q, nan), torch.full_like(q, nan)
    dk, dv = torch.full_like(k, nan), torch.full_like(v, nan)
    lse, delta = torch.full(q.shape[:3], nan, device=q.device), torch.full(q.shape[:3], nan, device=q.device)
    selection.selection_fwd(q, k, v, idx, sel_block, scale, o, lse)
    # selection_bwd's two steps, with the dQ kernel's delta output poisoned too
    selection.selection_dq(do, q, k, v, o, lse, idx, sel_block, scale, dq, delta)
    selection.selection_dkv(do, q, k, v, lse, delta, idx, sel_block, scale, dk, dv)
    return o, dq, dk, dv


def _check(B, T, H, G, D, sel_block, n, shared=True, dtype=torch.float32):
    q, k, v, do = _inputs(B, T, H, G, D, dtype)
    idx = _indices(B, T, H if shared else H * G, sel_block, n)
    got = _kernel_grads(q, k, v, do, idx, sel_block)
    p = NSAParams(sel_block=sel_block)
    exact, at_dtype = reference_runs(lambda q, k, v: reference.selection_attention(q, k, v, idx, p), (q, k, v),
                                     (do,), dtype)
    for name, g, e, t in zip(("o", "dq", "dk", "dv"), got, exact, at_dtype):
        assert g.dtype == dtype, name
        assert_close(g, e, t, name)


# Default tier: one small odd shape per dtype. The full tier sweeps T, G, index layouts and tilings.
@pytest.mark.parametrize("dtype,G", [(torch.float32, 4), (torch.bfloat16, 16)])
def test_small(dtype, G):
    _check(B=1, T=37, H=2 if G < 16 else 1, G=G, D=32, sel_block=16, n=3, dtype=dtype)


@pytest.mark.parametrize("dtype,G", [(torch.float32, 4), (torch.bfloat16, 16)])
def test_small_rows_major_dkv(dtype, G, monkeypatch):
    # Heads wider than KEYS_MAJOR_MAX_D take dK/dV's rows-major dots: the same check on that layout.
    monkeypatch.setattr(selection, "KEYS_MAJOR_MAX_D", 0)
    _check(B=1, T=37, H=2 if G < 16 else 1, G=G, D=32, sel_block=16, n=3, dtype=dtype)


@pytest.mark.full
@pytest.mark.parametrize("G", [1, 2, 4, 16])
@pytest.mark.parametrize("T", [1, 7, 61])
def test_shared_indices_fp32(G, T):
    _check(B=2 if G < 16 else 1, T=T, H=2 if G < 16 else 1, G=G, D=32, sel_block=16, n=3)


@pytest.mark.full
def test_per_head_indices_non_pow2_head_dim():
    _check(B=1, T=45, H=2, G=4, D=48, sel_block=16, n=3, shared=False)


@pytest.mark.full
def test_padding_more_slots_than_blocks():
    # n = 6 > the 4 blocks of T = 50: every row ends in -1 padding.
    _check(B=1, T=50, H=1, G=2, D=32, sel_block=16, n=6)


@pytest.mark.full
@pytest.mark.parametrize("G", [3, 16])
def test_odd_group_and_block_size(G):
    # l' = 24 pads the key tile to 32. G = 3 packs 21 tokens in a 64-row tile (the union walk);
    # G = 16 is one token's heads (the n-slot walk).
    _check(B=1, T=53, H=2 if G < 16 else 1, G=G, D=32, sel_block=24, n=2)


@pytest.mark.full
@pytest.mark.parametrize("G,shared", [(1, True), (2, True), (4, True), (16, True), (2, False)])
def test_bf16(G, shared):
    _check(B=1, T=39, H=1, G=G, D=32, sel_block=16, n=3, shared=shared, dtype=torch.bfloat16)


@pytest.mark.full
@pytest.mark.parametrize("shared", [True, False])
def test_split_blocks(monkeypatch, shared):
    # Tiny work items split every busy block across programs: exercises the partial-sum reduction.
    monkeypatch.setattr(selection, "_dkv_chunk", lambda total, n_keys: 3)
    _check(B=2, T=40, H=1, G=2, D=32, sel_block=16, n=3, shared=shared)


@pytest.mark.parametrize("keys_major", [True, False])
def test_dkv_causal_and_whole_steps(monkeypatch, keys_major):
    # Every row names all three blocks, future ones too (their keys are all hidden), and dK/dV walks 3
    # entries a step: each block's entries run through several masked steps (tokens before its last
    # key, the future picks among them), then several unmasked ones, the last ragged; the last block
    # is partial (T = 45, l' = 16).
    monkeypatch.setattr(selection, "DKV_LAUNCHES", {keys_major: ((6, 4, 1),)})
    monkeypatch.setattr(selection, "KEYS_MAJOR_MAX_D", 2**30 if keys_major else -1)
    q, k, v, do = _inputs(1, 45, 1, 2, 16, torch.float32)
    idx = torch.arange(3, dtype=torch.int32, device=DEVICE).expand(1, 45, 1, 3).contiguous()
    got = _kernel_grads(q, k, v, do, idx, 16)
    exact, at_dtype = reference_runs(lambda q, k, v: reference.selection_attention(q, k, v, idx, P16), (q, k, v),
                                     (do,), torch.float32)
    for name, g, e, t in zip(("o", "dq", "dk", "dv"), got, exact, at_dtype):
        assert_close(g, e, t, name)


@pytest.mark.full
def test_packed_tile_of_many_tokens(monkeypatch):
    # 128-row tiles at G = 2: 64 tokens per program, a wide union of block lists.
    monkeypatch.setattr(selection, "MIN_ROWS", 128)
    _check(B=1, T=70, H=1, G=2, D=32, sel_block=16, n=3)


@pytest.mark.parametrize("tt,Hs,n,T", [(1, 2, 3, 10), (2, 1, 3, 10), (3, 2, 3, 10), (2, 1, 3, 70),
                                        pytest.param(4, 1, 1200, 10, marks=pytest.mark.full)])
def test_tile_union(tt, Hs, n, T):
    # The union walk's lists: a tile's distinct valid blocks ascending, then NB; for each, the bit
    # mask of the tile's lists (token * Hs + head) that name it; the counts of blocks that end before
    # the tile's first token and of all valid ones. n = 1200 (full tier; ~25 s in the interpreter): lists
    # far longer than the 16 slots of the configs (a [lists, 2048] load of picks). Random picks
    # repeat blocks within a list. T = 70: 35 blocks, more than one step of the walk over blocks.
    B, H, bs = 2, 1, 2
    S = T - 1  # the last block is cut short: it is never whole
    NB = ceil_div(S, bs)
    idx = torch.randint(-1, NB + 1, (B, T, Hs, n), dtype=torch.int32)
    uni, bits, cnt = selection._tile_union(idx, H, S, bs, tt)
    assert uni.shape[:3] == (B, -(-T // tt), H) and uni.dtype == torch.int32 and bits.dtype == torch.int64
    for b in range(B):
        for i in range(uni.shape[1]):
            lists = idx[b, i * tt:(i + 1) * tt].flatten(0, 1)
            want = sorted({int(x) for x in lists.flatten() if 0 <= x < NB})
            want_bits = [sum(1 << l for l in range(lists.shape[0]) if j in lists[l].tolist()) for j in want]
            whole = sum(1 for j in want if (j + 1) * bs - 1 <= i * tt and (j + 1) * bs <= S)
            got = uni[b, i, 0].tolist()
            assert cnt[b, i, 0].tolist() == [whole, len(want)] and got[:len(want)] == want
            assert bits[b, i, 0, :len(want)].tolist() == want_bits
            assert all(x == NB for x in got[len(want):])


def _sorted_items(indices, H, S, sel_block, chunk):
    """`selection._dkv_items` by a stable sort and searchsorted, the way it was built before the counting sort."""
    B, T, Hs, n = indices.shape
    NB = ceil_div(S, sel_block)
    NK = B * H * NB
    dev = indices.device
    b = torch.arange(B, device=dev, dtype=torch.int32).view(B, 1, 1, 1)
    h = (torch.arange(Hs, device=dev, dtype=torch.int32) // (Hs // H)).view(1, 1, Hs, 1)
    keys = torch.where((indices >= 0) & (indices < NB), (b * H + h) * NB + indices, NK).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    entries = ((order // n) % (T * Hs)).to(torch.int32)
    offsets = torch.searchsorted(sorted_keys, torch.arange(NK + 1, device=dev, dtype=torch.int32))
    key_items = torch.clamp(ceil_div(offsets[1:] - offsets[:-1], chunk), min=1)
    ends = torch.cumsum(key_items, 0)
    w = torch.arange(NK + indices.numel() // chunk, device=dev)
    item_key = torch.searchsorted(ends, w, right=True)
    active = item_key < NK
    kc = item_key.clamp(max=NK - 1)
    lo = offsets[kc] + (w - ends[kc] + key_items[kc]) * chunk
    hi = torch.minimum(lo + chunk, offsets[kc + 1])
    split = active & (key_items[kc] > 1)
    item_slot = torch.where(split, torch.cumsum(split, 0) - 1, -1)
    hot = torch.where(key_items > 1, key_items, 0)
    return (entries, torch.where(active, item_key, -1), lo, hi, item_slot, key_items, torch.cumsum(hot, 0) - hot,
            max(1, 2 * indices.numel() // chunk))


@pytest.mark.parametrize("T,Hs,n,sel_block,chunk,rows", [
    (37, 2, 3, 4, None, None),  # one row group, no split keys
    pytest.param(37, 4, 4, 1, 3, (8, 4), marks=pytest.mark.full),  # 37 blocks: two bit-mask tiles; groups of two steps
    (13, 2, 1, 2, 5, (4, 4)),
    (66, 2, 2, 2, 5, None),  # 33 blocks: two bit-mask tiles, the second holding one block
    # 23 row groups: several steps of the scan over groups
    pytest.param(45, 4, 3, 4, 3, (4, 4), marks=pytest.mark.full),
])
def test_dkv_items_match_a_stable_sort(monkeypatch, T, Hs, n, sel_block, chunk, rows):
    # The counting sort's reverse index and work items are those of a stable sort by key: entries of
    # one key in (t, hs) order. Picks are distinct per list (as select_blocks gives them), out of the
    # blocks and two past the last (no block), a fifth of them -1. Spare items (key -1) need only an
    # empty slice; entries past the valid ones are never read.
    B, H = 2, 2
    NB = ceil_div(T, sel_block)
    if chunk is not None:
        monkeypatch.setattr(selection, "_dkv_chunk", lambda total, n_keys: chunk)
    if rows is not None:
        monkeypatch.setattr(selection, "SORT_ROWS", rows[0])
        monkeypatch.setattr(selection, "SORT_STEP_ROWS", rows[1])
    idx = torch.rand(B, T, Hs, NB + 2, device=DEVICE).argsort(-1)[..., :n].to(torch.int32)
    idx = torch.where(torch.rand(idx.shape, device=DEVICE) < 0.2, -1, idx).contiguous()
    got = selection._dkv_items(idx, H, T, sel_block)
    want = _sorted_items(idx, H, T, sel_block, selection._dkv_chunk(idx.numel(), B * H * NB))
    n_valid = int(((idx >= 0) & (idx < NB)).sum())
    assert torch.equal(got[0][:n_valid], want[0][:n_valid])
    live = want[1] >= 0
    for g, w in zip(got[1:7], want[1:7]):
        assert g.dtype == w.dtype and g.shape == w.shape
    assert torch.equal(got[1], want[1]) and torch.equal(got[4], want[4])
    assert torch.equal(got[2][live], want[2][live]) and torch.equal(got[3][live], want[3][live])
    assert torch.equal(got[2][~live], got[3][~live])
    assert torch.equal(got[5], want[5]) and torch.equal(got[6], want[6]) and got[7] == want[7]


def test_deterministic(monkeypatch):
    monkeypatch.setattr(selection, "_dkv_chunk", lambda total, n_keys: 5)
    q, k, v, do = _inputs(1, 48, 1, 4, 32, torch.float32)
    idx = _indices(1, 48, 1, 16, 3)
    a = _kernel_grads(q, k, v, do, idx, 16)
    b = _kernel_grads(q, k, v, do, idx, 16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_autograd_through_the_public_function():
    q, k, v, do = _inputs(1, 20, 1, 2, 16, torch.float32)
    idx = _indices(1, 20, 1, 16, 2)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    selection.selection_attention(qs, ks, vs, idx, P16).backward(do)
    exact, at_dtype = reference_runs(lambda q, k, v: reference.selection_attention(q, k, v, idx, P16), (q, k, v),
                                     (do,), torch.float32)
    for name, g, e, t in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad), exact[1:], at_dtype[1:]):
        assert_close(g, e, t, name)


def test_lse_is_not_differentiable():
    # The op's lse is the backward's statistic: it carries no gradient, and a loss on it alone fails.
    q, k, v, _ = _inputs(1, 9, 1, 2, 16, torch.float32)
    idx = _indices(1, 9, 1, 16, 1)
    o, lse, *_ = selection._fwd_op(q.requires_grad_(), k, v, idx, 16, 0.25)
    assert o.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_backward_reuses_the_forwards_tile_unions(monkeypatch):
    # The dQ tiles are the forward's: one union build per forward + backward, and the same gradients
    # as a backward that builds its own.
    q, k, v, do = _inputs(1, 21, 1, 4, 16, torch.float32)
    idx = _indices(1, 21, 1, 16, 2)
    builds = []
    build = selection._tile_union
    monkeypatch.setattr(selection, "_tile_union", lambda *a: builds.append(1) or build(*a))
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    selection.selection_attention(qs, ks, vs, idx, P16).backward(do)
    assert len(builds) == 1
    _, dq, dk, dv = _kernel_grads(q, k, v, do, idx, 16)
    for got, want in ((qs.grad, dq), (ks.grad, dk), (vs.grad, dv)):
        assert torch.equal(got, want)


@pytest.mark.full
def test_compile_without_graph_break():
    q, k, v, _ = _inputs(1, 9, 1, 2, 16, torch.float32)
    idx = _indices(1, 9, 1, 16, 1)
    fn = torch.compile(lambda q, k, v: selection.selection_attention(q, k, v, idx, P16) * 2,
                       backend="eager", fullgraph=True)
    exact, at_dtype = reference_runs(lambda q, k, v: 2 * reference.selection_attention(q, k, v, idx, P16), (q, k, v),
                                     (None,), torch.float32)
    assert_close(fn(q, k, v), exact[0], at_dtype[0], "o")


def test_input_errors():
    q, k, v, _ = _inputs(1, 8, 1, 2, 16, torch.float32)
    idx = _indices(1, 8, 1, 16, 1)
    with pytest.raises(NotImplementedError):
        selection.selection_attention(q, k, v, idx, NSAParams(sel_block=16, causal=False))
    with pytest.raises(NotImplementedError):
        selection.selection_attention(q, k, v, idx, P16, block_gate=torch.ones(1, 8, 1, 1))
    with pytest.raises(TypeError, match="int32"):
        selection.selection_attention(q, k, v, idx.long(), P16)
    with pytest.raises(TypeError, match="dtype"):
        selection.selection_attention(q, k.double(), v, idx, P16)
    with pytest.raises(ValueError, match="indices"):
        selection.selection_attention(q, k, v, idx[:, :4], P16)
    with pytest.raises(ValueError, match="multiple"):
        selection.selection_attention(q[:, :, :1].expand(1, 8, 3, 16), k.expand(1, 8, 2, 16),
                                      v.expand(1, 8, 2, 16), idx.expand(1, 8, 2, 1), P16)
    # Per-query-head lists with G = 128: 128 lists in a one-token tile, past the 64 its row masks hold.
    q128 = q[:, :, :1].expand(1, 8, 128, 16)
    with pytest.raises(ValueError, match="at most 64 block lists"):
        selection.selection_attention(q128, k, v, idx.expand(1, 8, 128, 1).contiguous(), P16)


@pytest.mark.gpu
@pytest.mark.parametrize("G,shared,dtype", [(16, True, torch.bfloat16), (4, True, torch.bfloat16),
                                             (1, True, torch.float32), (8, False, torch.bfloat16)])
def test_gpu_larger(G, shared, dtype):
    _check(B=2, T=1537, H=2, G=G, D=128, sel_block=64, n=8, shared=shared, dtype=dtype)
    _check(B=1, T=1000, H=1, G=G, D=96, sel_block=32, n=16, shared=shared, dtype=dtype)


SELECTION_CALL = """
from nsa.ops.common import NSAParams
from nsa.ops.selection import selection_attention
for dtype, HQ, H, D, Hs in [(torch.bfloat16, 64, 4, 128, 4), (torch.float32, 4, 2, 64, 4)]:
    T, n = 1024, 16
    x = lambda *shape: torch.zeros(*shape, dtype=dtype, requires_grad=True)
    q, k, v = x(1, T, HQ, D), x(1, T, H, D), x(1, T, H, D)
    cur = torch.arange(T).view(1, T, 1, 1) // 64
    idx = (cur - torch.arange(n).view(1, 1, 1, n)).expand(1, T, Hs, n).to(torch.int32)
    idx = torch.where(idx >= 0, idx, -1).contiguous()
    selection_attention(q, k, v, idx, NSAParams()).sum().backward()
"""
SELECTION_KERNELS = ["_sel_fwd_kernel", "_sel_dq_kernel", "_sel_dkv_kernel", "_sel_dkv_reduce_kernel",
                     "_tile_union_kernel", "_dkv_count_kernel", "_dkv_scan_kernel", "_dkv_place_kernel"]


@pytest.mark.full
@pytest.mark.parametrize("arch", [90, 80, 86])
def test_selection_kernels_compile_ahead_of_time_within_shared_memory(arch):
    # Forward, dQ, dK/dV and its reduction as launched on GPU: bf16 paper setting (shared G = 16) and
    # fp32 per-head selection with G = 2, D = 64. On sm_86 (99 KiB) dK/dV falls back to 64 rows per
    # step and 2 stages.
    from kernel_checks import compile_launches

    assert compile_launches("nsa.ops.selection", SELECTION_KERNELS, SELECTION_CALL, arch) >= 6
