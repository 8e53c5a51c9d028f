"""Triton streaming top-n (nsa.ops.topn) against `reference.topn_blocks`: exact index equality.

Inputs are random, so near-ties in importance (where rounding could legitimately flip the choice) are
unlikely at these sizes; exact ties (e.g. blocks no compressed key reaches yet, importance 0) occur
and resolve to the lower index in both; `test_exact_ties_go_to_the_lower_index` builds inputs whose
probabilities are exactly 0 or 1, so many importances tie exactly. Interpreter tiles are small (16 query
rows, 16 selection blocks per chunk), so T=300 with l'=16 crosses chunks and the carried-over overlap.
"""

import pytest
import torch

from nsa.ops import reference, topn
from nsa.ops.common import NSAParams, num_compressed_blocks
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
    lse = reference.compressed_attention(q, ck, ck, NSAParams(compress_block=block, compress_stride=stride,
                                                              num_mem=num_mem))[1]
    return compare(q, ck, lse, block, stride, sel_block, num_mem, n, num_initial, num_local, shared)


def compare(q, ck, lse, block, stride, sel_block, num_mem, n, num_initial=1, num_local=2, shared=True):
    p = NSAParams(compress_block=block, compress_stride=stride, sel_block=sel_block, num_mem=num_mem,
                  num_selected=n, num_initial=num_initial, num_local=num_local, shared_selection=shared)
    got = topn_blocks(q, ck, lse, p)
    want = reference.topn_blocks(q, ck, lse, p)
    assert got.dtype == torch.int32 and got.shape == want.shape
    bad = (got != want).any(-1)
    assert not bad.any(), f"{int(bad.sum())} rows differ, first at {bad.nonzero()[0].tolist()}: " \
                          f"{got[bad][0].tolist()} vs {want[bad][0].tolist()}"
    return got


# Default tier: one small shape per dtype and the exact ties; the full tier sweeps the rest.
def test_small():
    check(37, 4, 8, 4, 16, shared=False)


@pytest.mark.full
@pytest.mark.parametrize("T", [1, 7, 37, 70])
@pytest.mark.parametrize("block,stride,sel_block", [(8, 4, 16), (4, 4, 4), (16, 8, 8)])
def test_shapes_and_blocks(T, block, stride, sel_block):
    check(T, 2, block, stride, sel_block)


@pytest.mark.full
@pytest.mark.parametrize("shared", [True, False])
def test_many_chunks_carry(shared):
    # (8, 4, 16) is (32, 16, 64) scaled down: weights 1,2,2,2,1 over compressed blocks 4j-1 .. 4j+3.
    check(300, 1, 8, 4, 16, n=8, shared=shared)


@pytest.mark.full
@pytest.mark.parametrize("G", [1, 3, 4, 16])
@pytest.mark.parametrize("shared", [True, False])
def test_group_sizes(G, shared):
    check(37, G, 8, 4, 16, shared=shared, H=1)


@pytest.mark.full
@pytest.mark.parametrize("num_mem", [0, 2])
def test_memory_keys(num_mem):
    check(70, 2, 8, 4, 8, num_mem=num_mem)


@pytest.mark.full
def test_more_slots_than_blocks_and_other_forced_counts():
    out = check(70, 2, 4, 4, 4, n=32, num_initial=2, num_local=3)
    assert (out[:, :10, :, -1] == -1).all()


@pytest.mark.full
def test_single_slot_keeps_the_lowest_forced_block():
    check(70, 2, 8, 4, 8, n=1)


@pytest.mark.full
@pytest.mark.parametrize("n", [1, 32])
def test_several_chunks(n):
    # 75 selection blocks: 5 chunks of 16 in the interpreter, n=32 pads the chunk keys to 32.
    check(600, 1, 8, 4, 8, n=n, H=1)


@pytest.mark.full
@pytest.mark.parametrize("block,stride,sel_block", [(8, 4, 12), (16, 4, 8), (12, 4, 16)])
def test_overlap_shapes(block, stride, sel_block):
    # l'/d = 3 (padded to 4 per selection block); l/d = 4 over l'/d = 2 reaches two blocks ahead;
    # l/d = 3 over l'/d = 4 (weights 1,2,3,3 onto j and 2,1 onto j+1).
    check(200, 2, block, stride, sel_block, n=6, H=1)


def _tie_inputs(T, G, block, stride, num_mem, H, D, kind):
    """Inputs whose probabilities are exactly 0 or 1, so importances are small integers and tie exactly.
    all_equal: every visible p is 1 (ck = 0, lse = 0). zero: every p is 0 (lse = +inf). mixed: p is 1 or 0
    per (query head, compressed block): query rows 0 (p = 1) or 1, keys 0 (p = 1) or -100 (p = 0)."""
    S = num_mem + num_compressed_blocks(T, block, stride)
    q = torch.ones(1, T, H * G, D)
    ck = torch.zeros(1, S, H, D)
    lse = torch.zeros(1, T, H * G)
    if kind == "zero":
        lse.fill_(float("inf"))
    elif kind == "mixed":
        q *= (torch.rand(1, T, H * G, 1) < 0.7).float()
        ck -= 100 * (torch.rand(1, S, H, 1) < 0.5).float()
    return q, ck, lse


@pytest.mark.parametrize("kind", [pytest.param("all_equal", marks=pytest.mark.full),
                                  pytest.param("zero", marks=pytest.mark.full), "mixed"])
@pytest.mark.parametrize("shared", [True, pytest.param(False, marks=pytest.mark.full)])
def test_exact_ties_go_to_the_lower_index(kind, shared):
    # 18 selection blocks: two chunks in the interpreter; n = 32 leaves slots empty for every query.
    q, ck, lse = _tie_inputs(140, 2, 8, 4, 1, 1, 16, kind)
    for n in (1, 5, 32):
        out = compare(q, ck, lse, 8, 4, 8, 1, n, shared=shared)
        if kind == "zero" and n == 5:  # t = 130: forced 0, 15, 16, then the lowest indices among the zeros
            assert out[0, 130, 0].tolist() == [0, 1, 2, 15, 16]
    if kind == "all_equal":  # nothing forced: every tie decides
        compare(q, ck, lse, 8, 4, 8, 1, 3, num_initial=0, num_local=0, shared=shared)


def test_bf16():
    check(70, 4, 8, 4, 16, dtype=torch.bfloat16, D=64, H=1)


@pytest.mark.full
def test_head_dim_96():
    check(37, 2, 8, 4, 8, D=96, H=1)


@pytest.mark.full
def test_compiles_without_graph_break():
    q, ck = torch.randn(1, 37, 2, 16), torch.randn(1, 1 + num_compressed_blocks(37, 8, 4), 1, 16)
    p = NSAParams(compress_block=8, compress_stride=4, sel_block=16, num_mem=1, num_selected=3)
    lse = reference.compressed_attention(q, ck, ck, p)[1]
    f = torch.compile(lambda q, ck, lse: topn_blocks(q, ck, lse, p), backend="aot_eager", fullgraph=True)
    assert torch.equal(f(q, ck, lse), reference.topn_blocks(q, ck, lse, p))


def test_not_causal_raises():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(NotImplementedError):
        topn_blocks(q, q, q[..., 0], NSAParams(compress_block=4, compress_stride=4, sel_block=4, num_mem=0,
                                             num_selected=4, causal=False))


def _gpu_check_tolerant(T, G, shared, dtype, H=4, D=128, n=16):
    """At GPU sizes rounding may flip near-tied blocks; accept a row only if what differs is a near-tie:
    the importance (reference's) of the blocks only the kernel picked matches that of the blocks only
    the reference picked, within 1e-4 relative."""
    q = torch.randn(1, T, H * G, D, device="cuda", dtype=dtype)
    ck = torch.randn(1, 1 + num_compressed_blocks(T, 32, 16), H, D, device="cuda", dtype=dtype)
    p = NSAParams(num_selected=n, shared_selection=shared)
    lse = reference.compressed_attention(q, ck, ck, p)[1]
    got = topn_blocks(q, ck, lse, p)
    want = reference.topn_blocks(q, ck, lse, p)
    bad = (got != want).any(-1)
    if bad.any():
        imp = reference.block_importance(q, ck, lse, p)
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


TOPN_CALL = """
from nsa.ops.common import NSAParams
for dtype, shared, n, D in [(torch.bfloat16, True, 16, 128), (torch.float32, False, 32, 64),
                            (torch.bfloat16, False, 16, 128)]:
    T, H, G = 2048, 2, 16
    q, ck = torch.zeros(1, T, H * G, D, dtype=dtype), torch.zeros(1, 128, H, D, dtype=dtype)
    mod.topn_blocks(q, ck, torch.zeros(1, T, H * G), NSAParams(num_selected=n, shared_selection=shared))
"""


@pytest.mark.full
@pytest.mark.parametrize("arch", [90, 80, 86])
def test_compiles_ahead_of_time_within_shared_memory(arch):
    """Compile the real kernel for an H100, an A100 and a consumer card (bf16 paper setting shared and
    not, and fp32 / unshared / n > BJ / D=64) with no GPU. Catches what only the compiler rejects
    (Triton 3.6 refused to re-assign `HALF: tl.constexpr` in the bitonic network's unrolled loop)."""
    from kernel_checks import compile_launches

    assert compile_launches("nsa.ops.topn", ["_topn_kernel"], TOPN_CALL, arch) == 3
