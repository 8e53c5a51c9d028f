"""Triton streaming top-n (nsa.ops.topn) against `reference.topn_blocks`: exact index equality.

Inputs are random, so near-ties in importance (where rounding could legitimately flip the choice) are
unlikely at these sizes; exact ties (e.g. blocks no compressed key reaches yet, importance 0) occur
and resolve to the lower index in both. Interpreter tiles are small (16 query rows, 16 selection
blocks per chunk), so T=300 with l'=16 crosses chunks and the carried-over overlap.
"""

import pytest
import torch

from nsa.ops import reference, topn
from nsa.ops.common import num_compressed_blocks
from nsa.ops.topn import topn_blocks


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """The output starts as -7, an index the kernel never writes, so unwritten elements show."""
    def empty(shape, dtype, device):
        return torch.full(shape, -7, dtype=dtype, device=device)

    monkeypatch.setattr(topn, "_empty", empty)


def check(T, G, block, stride, sel_block, num_mem=1, n=5, shared=True, num_initial=1, num_local=2, B=1, H=2,
          D=16, dtype=torch.float32, dev=None):
    dev = dev or ("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.randn(B, T, H * G, D, device=dev, dtype=dtype)
    ck = torch.randn(B, num_mem + num_compressed_blocks(T, block, stride), H, D, device=dev, dtype=dtype)
    lse = reference.compressed_attention(q, ck, ck, block, stride, num_mem)[1]
    args = (q, ck, lse, block, stride, sel_block, num_mem, n, num_initial, num_local, shared)
    got = topn_blocks(*args)
    want = reference.topn_blocks(*args)
    assert got.dtype == torch.int32 and got.shape == want.shape
    bad = (got != want).any(-1)
    assert not bad.any(), f"{int(bad.sum())} rows differ, first at {bad.nonzero()[0].tolist()}: " \
                          f"{got[bad][0].tolist()} vs {want[bad][0].tolist()}"
    return got


@pytest.mark.parametrize("T", [1, 7, 37, 70])
@pytest.mark.parametrize("block,stride,sel_block", [(8, 4, 16), (4, 4, 4), (16, 8, 8)])
def test_shapes_and_blocks(T, block, stride, sel_block):
    check(T, 2, block, stride, sel_block)


@pytest.mark.parametrize("shared", [True, False])
def test_many_chunks_carry(shared):
    # (8, 4, 16) is (32, 16, 64) scaled down: weights 1,2,2,2,1 over compressed blocks 4j-1 .. 4j+3.
    check(300, 1, 8, 4, 16, n=8, shared=shared)


@pytest.mark.parametrize("G", [1, 3, 4, 16])
@pytest.mark.parametrize("shared", [True, False])
def test_group_sizes(G, shared):
    check(37, G, 8, 4, 16, shared=shared, H=1)


@pytest.mark.parametrize("num_mem", [0, 2])
def test_memory_keys(num_mem):
    check(70, 2, 8, 4, 8, num_mem=num_mem)


def test_more_slots_than_blocks_and_other_forced_counts():
    out = check(70, 2, 4, 4, 4, n=32, num_initial=2, num_local=3)
    assert (out[:, :10, :, -1] == -1).all()


def test_single_slot_keeps_the_lowest_forced_block():
    check(70, 2, 8, 4, 8, n=1)


def test_bf16():
    check(70, 4, 8, 4, 16, dtype=torch.bfloat16, D=64, H=1)


def test_head_dim_96():
    check(37, 2, 8, 4, 8, D=96, H=1)


def test_compiles_without_graph_break():
    q, ck = torch.randn(1, 37, 2, 16), torch.randn(1, 1 + num_compressed_blocks(37, 8, 4), 1, 16)
    lse = reference.compressed_attention(q, ck, ck, 8, 4, 1)[1]
    f = torch.compile(lambda q, ck, lse: topn_blocks(q, ck, lse, 8, 4, 16, 1, 3), backend="aot_eager",
                      fullgraph=True)
    assert torch.equal(f(q, ck, lse), reference.topn_blocks(q, ck, lse, 8, 4, 16, 1, 3))


def test_not_causal_raises():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(NotImplementedError):
        topn_blocks(q, q, q[..., 0], 4, 4, 4, 0, 2, causal=False)


def _gpu_check_tolerant(T, G, shared, dtype, H=4, D=128, n=16):
    """At GPU sizes rounding may flip near-tied blocks; accept a row only if what differs is a near-tie:
    the importance (reference's) of the blocks only the kernel picked matches that of the blocks only
    the reference picked, within 1e-4 relative."""
    q = torch.randn(1, T, H * G, D, device="cuda", dtype=dtype)
    ck = torch.randn(1, 1 + num_compressed_blocks(T, 32, 16), H, D, device="cuda", dtype=dtype)
    lse = reference.compressed_attention(q, ck, ck, 32, 16, 1)[1]
    got = topn_blocks(q, ck, lse, 32, 16, 64, 1, n, shared=shared)
    want = reference.topn_blocks(q, ck, lse, 32, 16, 64, 1, n, shared=shared)
    bad = (got != want).any(-1)
    if bad.any():
        imp = reference.block_importance(q, ck, lse, 32, 16, 64, 1, shared)
        gathered = [imp[bad].gather(-1, x[bad].clamp_min(0).long()).where(x[bad] >= 0, 0).sum(-1) for x in (got, want)]
        assert torch.allclose(*gathered, rtol=1e-4, atol=1e-6)
    assert bad.float().mean() < 1e-3, f"{bad.float().mean():.2%} rows differ"


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 3, 16, 64])
@pytest.mark.parametrize("shared", [True, False])
def test_gpu_paper_setting(G, shared):
    _gpu_check_tolerant(2048, G, shared, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fp32_n32():
    _gpu_check_tolerant(4096, 16, True, torch.float32, n=32)
