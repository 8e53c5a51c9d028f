"""The reference ops against brute-force, loop-by-loop readings of docs/SPEC.md section 1."""

import math

import pytest
import torch

from nsa.ops import reference as R
from nsa.ops.common import NSAParams, ceil_div, num_compressed_blocks

TRIPLES = [(32, 16, 64), (16, 8, 16), (8, 4, 16), (4, 4, 4), (64, 16, 32), (16, 16, 48), (12, 4, 8)]


@pytest.mark.parametrize("block,stride,sel_block", TRIPLES)
def test_overlap_matrix_counts_shared_chunks(block, stride, sel_block):
    n_cmp, n_sel = 12, 7
    C = R.overlap_matrix(n_cmp, n_sel, block, stride, sel_block)
    for i in range(n_cmp):
        cmp_chunks = {c for c in range(200) if i * stride <= c * stride < i * stride + block}
        for j in range(n_sel):
            sel_chunks = {c for c in range(200) if j * sel_block <= c * stride < (j + 1) * sel_block}
            assert C[i, j] == len(cmp_chunks & sel_chunks)


def test_overlap_matrix_paper_weights():
    # l=32, d=16, l'=64: block j collects weights 1,2,2,2,1 from compressed blocks 4j-1 .. 4j+3.
    C = R.overlap_matrix(20, 5, 32, 16, 64)
    assert C[3:8, 1].tolist() == [1, 2, 2, 2, 1]
    assert C[:, 1].sum() == 8
    # l = l' = d: the identity.
    assert torch.equal(R.overlap_matrix(6, 6, 16, 16, 16), torch.eye(6, dtype=C.dtype))


@pytest.mark.parametrize("T,block,stride", [(1, 4, 2), (3, 4, 2), (4, 4, 2), (37, 8, 4), (64, 32, 16)])
def test_num_compressed_blocks(T, block, stride):
    brute = sum(1 for i in range(T) if i * stride + block <= T)
    assert num_compressed_blocks(T, block, stride) == brute


def _rand(B, T, HQ, H, D, n_cmp, num_mem, dtype=torch.float32):
    q = torch.randn(B, T, HQ, D, dtype=dtype)
    ck = torch.randn(B, num_mem + n_cmp, H, D, dtype=dtype)
    cv = torch.randn(B, num_mem + n_cmp, H, D, dtype=dtype)
    return q, ck, cv


def test_compressed_attention_matches_loops():
    B, T, HQ, H, D, l, d, m = 1, 29, 4, 2, 8, 8, 4, 2
    n_cmp = num_compressed_blocks(T, l, d)
    q, ck, cv = _rand(B, T, HQ, H, D, n_cmp, m)
    o, lse = R.compressed_attention(q, ck, cv, NSAParams(compress_block=l, compress_stride=d, num_mem=m))
    for t in range(T):
        for hq in range(HQ):
            h = hq // (HQ // H)
            keys = list(range(m)) + [m + i for i in range(n_cmp) if i * d + l - 1 <= t]
            s = torch.stack([q[0, t, hq] @ ck[0, j, h] for j in keys]) / math.sqrt(D)
            p = s.softmax(0)
            assert torch.allclose(o[0, t, hq], (p[:, None] * cv[0, keys, h]).sum(0), atol=1e-5)
            assert torch.allclose(lse[0, t, hq], s.logsumexp(0), atol=1e-5)


def test_compressed_attention_empty_rows_are_zero_not_nan():
    q, ck, cv = _rand(1, 10, 2, 1, 4, num_compressed_blocks(10, 8, 4), 0)
    for x in (q, ck, cv):
        x.requires_grad_(True)
    o, lse = R.compressed_attention(q, ck, cv, NSAParams(compress_block=8, compress_stride=4, num_mem=0))
    assert torch.all(o[0, :7] == 0) and torch.all(torch.isneginf(lse[0, :7]))
    assert torch.isfinite(lse[0, 7:]).all()
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, ck, cv))


def _importance_row(q, ck, lse, t, hq, num_mem, block, stride, sel_block, n_cmp, n_sel):
    """p_slc for one query and query head, read straight off the spec: shared d-chunks by set counting."""
    D, h = q.shape[-1], hq // (q.shape[2] // ck.shape[2])
    row = torch.zeros(n_sel)
    for i in range(n_cmp):
        if i * stride + block - 1 > t:
            continue
        p = torch.exp(q[0, t, hq] @ ck[0, num_mem + i, h] / math.sqrt(D) - lse[0, t, hq])
        for j in range(n_sel):
            shared_tokens = set(range(i * stride, i * stride + block)) & set(range(j * sel_block, (j + 1) * sel_block))
            row[j] += p * (len(shared_tokens) // stride)
    return row


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("block,stride,sel_block", [(8, 4, 16), (4, 4, 4), (16, 4, 8)])
def test_block_importance_matches_loops(shared, block, stride, sel_block):
    B, T, HQ, H, D, m = 1, 37, 4, 2, 8, 1
    G = HQ // H
    n_cmp, n_sel = num_compressed_blocks(T, block, stride), ceil_div(T, sel_block)
    q, ck, cv = _rand(B, T, HQ, H, D, n_cmp, m)
    p = NSAParams(compress_block=block, compress_stride=stride, sel_block=sel_block, num_mem=m, shared_selection=shared)
    _, lse = R.compressed_attention(q, ck, cv, p)
    imp = R.block_importance(q, ck, lse, p)
    assert imp.shape == (B, T, H if shared else HQ, n_sel)
    for t in (0, 11, 20, 36):
        rows = [_importance_row(q, ck, lse, t, hq, m, block, stride, sel_block, n_cmp, n_sel) for hq in range(HQ)]
        for hs in range(imp.shape[2]):
            want = sum(rows[hs * G:(hs + 1) * G]) if shared else rows[hs]
            assert torch.allclose(imp[0, t, hs], want, atol=1e-5)


def _brute_select(scores, t, sel_block, n, num_initial, num_local):
    cur = t // sel_block
    valid = list(range(cur + 1))
    forced = [j for j in valid if j < num_initial or 0 <= cur - j < num_local]
    rest = sorted((j for j in valid if j not in forced), key=lambda j: (-scores[j], j))
    picked = sorted(forced + rest[: max(0, n - len(forced))])
    return picked + [-1] * (n - len(picked))


@pytest.mark.parametrize("T", [1, 5, 16, 63, 100])
@pytest.mark.parametrize("n,num_initial,num_local", [(4, 1, 2), (6, 2, 1), (3, 0, 0)])
def test_select_blocks_brute_force(T, n, num_initial, num_local):
    sel_block = 8
    imp = torch.rand(2, T, 3, ceil_div(T, sel_block))
    idx = R.select_blocks(imp, NSAParams(sel_block=sel_block, num_selected=n, num_initial=num_initial,
                                         num_local=num_local))
    assert idx.dtype == torch.int32 and idx.shape == (2, T, 3, n)
    for b in range(2):
        for t in range(T):
            for h in range(3):
                want = _brute_select(imp[b, t, h].tolist(), t, sel_block, n, num_initial, num_local)
                assert idx[b, t, h].tolist() == want


def test_select_blocks_ties_go_to_lower_index():
    T, sel_block = 64, 4
    imp = torch.ones(1, T, 1, T // sel_block)
    idx = R.select_blocks(imp, NSAParams(sel_block=sel_block, num_selected=5))
    # Query 63: forced 0, 14, 15; the two free picks are the lowest tied indices 1 and 2.
    assert idx[0, 63, 0].tolist() == [0, 1, 2, 14, 15]


def test_selected_blocks_never_in_future_and_forced_always_present():
    T, sel_block = 200, 16
    imp = torch.randn(1, T, 2, ceil_div(T, sel_block)).exp()
    idx = R.select_blocks(imp, NSAParams(sel_block=sel_block, num_selected=5))
    t = torch.arange(T)[None, :, None, None]
    assert torch.all((idx < 0) | (idx <= t // sel_block))
    for tt in range(T):
        row = set(idx[0, tt, 0].tolist())
        cur = tt // sel_block
        assert {0, cur, max(cur - 1, 0)} <= row


def test_selection_attention_matches_loops():
    B, T, HQ, H, D, sel_block = 1, 45, 4, 2, 8, 8
    G = HQ // H
    q = torch.randn(B, T, HQ, D)
    k, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    for shared in (True, False):
        Hs = H if shared else HQ
        p = NSAParams(sel_block=sel_block, num_selected=3)
        idx = R.select_blocks(torch.rand(B, T, Hs, ceil_div(T, sel_block)), p)
        o = R.selection_attention(q, k, v, idx, p)
        for t in (0, 9, 30, 44):
            for hq in range(HQ):
                h = hq // G
                blocks = [j for j in idx[0, t, h if shared else hq].tolist() if j >= 0]
                keys = [s for s in range(t + 1) if s // sel_block in blocks]
                p = torch.stack([q[0, t, hq] @ k[0, s, h] for s in keys]).div(math.sqrt(D)).softmax(0)
                assert torch.allclose(o[0, t, hq], (p[:, None] * v[0, keys, h]).sum(0), atol=1e-5)


def test_selection_block_gate_is_identity_forward_and_carries_gradient():
    B, T, HQ, H, D, sel_block = 1, 20, 2, 1, 4, 4
    q, k, v = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    p = NSAParams(sel_block=sel_block, num_selected=3)
    idx = R.select_blocks(torch.rand(B, T, H, 5), p)
    score = torch.rand(B, T, H, 3, requires_grad=True)
    gate = 1 + score - score.detach()
    o = R.selection_attention(q, k, v, idx, p, block_gate=gate)
    assert torch.allclose(o, R.selection_attention(q, k, v, idx, p), atol=1e-6)
    o.square().sum().backward()
    assert score.grad.abs().sum() > 0


@pytest.mark.parametrize("window", [1, 4, 50])
def test_sliding_window_matches_loops(window):
    T, D = 23, 8
    q, k, v = torch.randn(1, T, 2, D), torch.randn(1, T, 1, D), torch.randn(1, T, 1, D)
    o = R.sliding_window_attention(q, k, v, NSAParams(window=window))
    for t in range(T):
        keys = list(range(max(0, t - window + 1), t + 1))
        p = torch.stack([q[0, t, 1] @ k[0, s, 0] for s in keys]).div(math.sqrt(D)).softmax(0)
        assert torch.allclose(o[0, t, 1], (p[:, None] * v[0, keys, 0]).sum(0), atol=1e-5)


def test_dense_reference_matches_sdpa():
    q, k, v = torch.randn(2, 31, 4, 8), torch.randn(2, 31, 2, 8), torch.randn(2, 31, 2, 8)
    o = R.dense_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(o, ref, atol=1e-5)


def test_topn_blocks_is_importance_then_select():
    B, T, HQ, H, D, l, d, lp, m = 1, 50, 4, 2, 8, 8, 4, 8, 1
    q, ck, cv = _rand(B, T, HQ, H, D, num_compressed_blocks(T, l, d), m)
    p = NSAParams(compress_block=l, compress_stride=d, sel_block=lp, num_mem=m, num_selected=4)
    _, lse = R.compressed_attention(q, ck, cv, p)
    idx = R.topn_blocks(q, ck, lse, p)
    assert torch.equal(idx, R.select_blocks(R.block_importance(q, ck, lse, p), p))


def test_compressed_attention_with_no_keys_at_all():
    """num_mem = 0 and T < block: no compressed key exists yet."""
    q = torch.randn(1, 5, 2, 4, requires_grad=True)
    ck = torch.zeros(1, 0, 1, 4)
    o, lse = R.compressed_attention(q, ck, ck, NSAParams(compress_block=8, compress_stride=4, num_mem=0))
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    o.sum().backward()
    assert torch.all(q.grad == 0)


def test_block_importance_gradient_finite_without_memory_keys():
    # num_mem = 0: the first tokens see no compressed block (lse = -inf). Their importance is 0, and
    # the gradient through it must be 0 too, not exp(+inf) * 0 = NaN.
    p = NSAParams(num_mem=0, compress_block=8, compress_stride=4, sel_block=8)
    q, ck, cv = _rand(1, 20, 4, 2, 8, num_compressed_blocks(20, 8, 4), 0)
    q, ck = q.requires_grad_(), ck.requires_grad_()
    _, lse = R.compressed_attention(q, ck, cv, p)
    assert torch.isinf(lse[0, :7]).all()
    imp = R.block_importance(q, ck, lse, p)
    (imp * torch.randn_like(imp)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(ck.grad).all()
