"""The Triton decode kernel (nsa/ops/decode.py) against the reference decode step.

On CPU this runs under TRITON_INTERPRET=1 (set by conftest.py), with small shapes."""

import pytest
import torch

from nsa.ops import reference

decode = pytest.importorskip("nsa.ops.decode")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, G, D, S, num_mem, block, stride, window_slots, t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)

    HQ = H * G
    nc = max(0, (S - block) // stride + 1)
    q, q_rot = rnd(B, HQ, D, scale=2.0), rnd(B, HQ, D, scale=2.0)
    ck, cv = rnd(B, num_mem + nc, H, D), rnd(B, num_mem + nc, H, D)
    k_slc, v_slc = rnd(B, S, H, D), rnd(B, S, H, D)
    if window_slots is None:
        k_win, v_win = k_slc, v_slc
    else:
        k_win, v_win = rnd(B, window_slots, H, D), rnd(B, window_slots, H, D)
    gates = torch.rand(B, HQ, 3, generator=gen).to(DEVICE, dtype)
    t = torch.tensor(t, device=DEVICE)
    return q, q_rot, ck, cv, k_slc, v_slc, k_win, v_win, gates, t


def _sorted_idx(idx):
    big = torch.iinfo(torch.int32).max
    s = torch.where(idx < 0, big, idx).sort(-1).values
    return torch.where(s == big, -1, s)


CASES = [
    # G, num_mem, (l, d, l'), ring window slots (None: the selection cache), shared selection
    (1, 1, (8, 4, 8), None, True),
    (2, 0, (8, 4, 16), 16, True),
    (4, 1, (8, 4, 16), None, True),
    (16, 1, (8, 8, 8), 16, True),
    (4, 1, (8, 4, 16), None, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[0]}-mem{c[1]}-l{c[2]}-ring{c[3]}-shared{c[4]}")
def test_decode_kernel_matches_reference(case, dtype):
    G, num_mem, (block, stride, sel_block), ring, shared = case
    B, H, D, S, window, n = 3, 2, 16, 64, 16, 4
    # t crosses the block boundaries: before l - 1, at l - 1, mid-sequence, the last position
    t = [3, block - 1, 40] if num_mem else [block - 1, 30, S - 1]
    args = _inputs(B, H, G, D, S, num_mem, block, stride, ring, t, dtype)
    kw = dict(block=block, stride=stride, sel_block=sel_block, num_mem=num_mem, num_selected=n, window=window,
              shared=shared, return_indices=True)
    o_ref, idx_ref = reference.decode_attention(*args, **kw)
    o, idx = decode.decode_attention(*args, **kw)
    assert torch.equal(_sorted_idx(idx.cpu()), idx_ref.cpu())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o.float().cpu(), o_ref.float().cpu(), **tol)


# Split-K paths with small chunks: several compressed tiles (SEL_PER_TILE = 16 selection blocks each) shared
# by fewer programs (each walks tiles c, c + P1, ...), a compressed block spilling across the tile border
# (l/d > 1; l/d = 4 > l'/d = 1 spills into 3 blocks), a non power of two l'/d, local top-n's smaller than n
# (select_chunk 4 < n = 6: the merge matters), several window chunks and several selected-block programs.
CROSS_CASES = [
    # G, num_mem, (l, d, l'), ring slots, shared, S, cmp_splits, sel_splits
    (1, 1, (8, 4, 8), None, True, 200, 1, 1),
    (2, 0, (8, 4, 32), 48, True, 600, 2, 4),  # l' = 32 > block_n = 16: two key tiles per selected block
    (4, 1, (16, 4, 4), 48, True, 160, 1, 3),
    (16, 1, (8, 8, 8), None, True, 200, 2, 2),
    (2, 2, (8, 4, 12), None, False, 256, 3, 6),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: f"G{c[0]}-mem{c[1]}-l{c[2]}-ring{c[3]}-shared{c[4]}-S{c[5]}")
def test_decode_kernel_split_across_tiles(case, dtype):
    G, num_mem, (block, stride, sel_block), ring, shared, S, p1, p3 = case
    B, H, D, window, n = 4, 2, 16, 40, 6
    ct = 16 * (sel_block // stride)  # compressed blocks per tile
    t_edge = (ct - 1) * stride + block - 1  # the last position whose compressed blocks all lie in tile 0
    # per sequence: tile 0 exactly full, one block into tile 1 (spill), the end of the cache, a short one
    t = [t_edge, t_edge + stride, S - 1, block + 2]
    assert t[1] < S
    args = _inputs(B, H, G, D, S, num_mem, block, stride, ring, t, dtype, seed=1)
    kw = dict(block=block, stride=stride, sel_block=sel_block, num_mem=num_mem, num_selected=n, window=window,
              shared=shared, return_indices=True)
    o_ref, idx_ref = reference.decode_attention(*args, **kw)
    o, idx = decode.decode_attention(*args, **kw, block_n=16, sel_per_tile=16, cmp_splits=p1, window_chunk=16,
                                     select_chunk=4, sel_splits=p3)
    assert torch.equal(_sorted_idx(idx.cpu()), idx_ref.cpu())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o.float().cpu(), o_ref.float().cpu(), **tol)
    if dtype == torch.float32:
        # Every block picked (n = all selection blocks): the pick order is the whole importance ranking, so
        # each block's importance (spills across tile borders included) must rank as in the reference.
        ns = -(-S // sel_block)
        kw.update(num_selected=ns)
        _, idx = decode.decode_attention(*args, **kw, block_n=16, sel_per_tile=16, cmp_splits=p1, window_chunk=16,
                                         select_chunk=4, sel_splits=1)
        assert torch.equal(idx.cpu(), _reference_ranking(args, **kw))


def _reference_ranking(args, block, stride, sel_block, num_mem, num_selected, shared, **_):
    # The reference's importance scores (decode_attention's formula), ranked descending, ties to the lower
    # index, invalid blocks -1: the order in which the kernel picks blocks.
    q, _, ck, cv, k_slc = (x.cpu().float() for x in args[:5])
    t = args[9].cpu().long()
    B, HQ, D = q.shape
    H = ck.shape[2]
    nc = ck.shape[1] - num_mem
    vis = (torch.arange(nc) * stride + block - 1)[None, :] <= t[:, None]
    vis_all = torch.cat([torch.ones(B, num_mem, dtype=torch.bool), vis], 1)
    _, lse = reference.attend(q[:, None], ck, cv, vis_all[:, None, None, None, :], D**-0.5)
    s = torch.einsum("bhgd,bshd->bhgs", q.view(B, H, HQ // H, D), ck[:, num_mem:]) * D**-0.5
    p = torch.where(vis[:, None, None, :], torch.exp(s - lse.view(B, H, -1, 1)), torch.zeros_like(s))
    ns = -(-k_slc.shape[1] // sel_block)
    imp = p @ reference.overlap_matrix(nc, ns, block, stride, sel_block).float()
    imp = imp.sum(2) if shared else imp.reshape(B, HQ, ns)
    j = torch.arange(ns)[None, :]
    cur = (t // sel_block)[:, None]
    valid = j <= cur
    forced = valid & ((j < 1) | ((cur - j >= 0) & (cur - j < 2)))
    score = imp.masked_fill(forced[:, None], float("inf")).masked_fill(~valid[:, None], float("-inf"))
    top, order = torch.sort(score, dim=-1, descending=True, stable=True)
    return torch.where(top[..., :num_selected] > float("-inf"), order[..., :num_selected], -1).to(torch.int32)


def test_decode_kernel_picks_in_importance_order():
    # The kernel returns the picks in the order of the merged top-n: forced blocks (+inf) first, lowest
    # index first, then importance descending; the reference sorts them ascending.
    args = _inputs(2, 2, 4, 16, 256, 1, 8, 4, None, [255, 130], torch.float32, seed=2)
    kw = dict(block=8, stride=4, sel_block=16, num_mem=1, num_selected=5, window=16, return_indices=True)
    _, idx = decode.decode_attention(*args, **kw, select_chunk=4, cmp_splits=1)
    _, idx_ref = reference.decode_attention(*args, **kw)
    assert torch.equal(_sorted_idx(idx.cpu()), idx_ref.cpu())
    t = torch.tensor([255, 130])
    for b in range(2):
        cur = int(t[b]) // 16
        forced = [0] + [j for j in (cur - 1, cur) if j > 0]
        assert idx[b, :, : len(forced)].cpu().tolist() == [sorted(forced)] * 2


def test_decode_kernel_empty_compressed_set_is_finite():
    # num_mem = 0 and t < l - 1: no compressed key at all, o_cmp must be 0, not NaN.
    args = _inputs(1, 1, 4, 16, 32, 0, 8, 4, None, [2], torch.float32)
    kw = dict(block=8, stride=4, sel_block=8, num_mem=0, num_selected=4, window=16)
    o = decode.decode_attention(*args, **kw)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, reference.decode_attention(*args, **kw), atol=1e-5, rtol=1e-5)


def test_model_decode_through_triton_matches_torch():
    # The whole cached decode path with backend 'triton' (interpreter on CPU) against backend 'torch'.
    from nsa.cache import ModelCache
    from nsa.config import ModelConfig, NSAConfig
    from nsa.model import Transformer

    nsa = NSAConfig(compress_block=8, compress_stride=4, sel_block=16, num_selected=4, window=16, backend="torch",
                    separate_kv=True)
    model = Transformer(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, nsa=nsa)).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 256, (2, 30), device=DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        nsa.backend = backend
        cache = ModelCache(model, 2, 30)
        with torch.no_grad():
            model.prefill(idx[:, :10], cache) if backend == "torch" else _prefill_torch(model, idx[:, :10], cache)
            outs.append(torch.stack([model.decode_step(idx[:, i], cache) for i in range(10, 30)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def _prefill_torch(model, prompt, cache):
    # The prefill forward itself uses the parallel ops; keep those on the reference here.
    nsa = model.blocks[0].attn.cfg
    nsa.backend = "torch"
    out = model.prefill(prompt, cache)
    nsa.backend = "triton"
    return out


@pytest.mark.gpu
def test_decode_kernel_cuda_graph_replay():
    # Grid sizes depend on shapes only: one captured step serves any t (written into the same tensor).
    args = list(_inputs(2, 4, 16, 128, 4096, 1, 32, 16, None, [4095, 1000], torch.bfloat16))
    kw = dict(block=32, stride=16, sel_block=64, num_mem=1, num_selected=16, window=512)
    t = args[9]
    decode.decode_attention(*args, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = decode.decode_attention(*args, **kw)
    for tv in ([4095, 1000], [70, 3000], [31, 5]):
        t.copy_(torch.tensor(tv))
        graph.replay()
        torch.testing.assert_close(o.float(), reference.decode_attention(*args, **kw).float(), atol=2e-2, rtol=2e-2)
