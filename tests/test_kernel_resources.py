"""scripts/kernel_resources.py: a launch's registers, spills and shared memory, compiled for sm_90 with no GPU."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import kernel_resources  # noqa: E402


@pytest.mark.full
def test_launch_resources_of_the_topn_kernel():
    pytest.importorskip("triton.backends.nvidia")
    call = "T, HQ, H, D = 256, 8, 1, 64\n" + kernel_resources.MODEL_CALLS["nsa.ops.topn"][1]
    (r,) = kernel_resources.launch_resources("nsa.ops.topn", ["_topn_kernel"], call)
    assert r["kernel"] == "_topn_kernel" and r["launch"]["num_warps"] == 8
    assert 0 < r["shared"] <= kernel_resources.ARCHS[90][1]
    if r["regs"] is not None:  # cuobjdump ships with Triton's NVIDIA backend
        assert 0 < r["regs"] <= 255 and r["stl"] >= 0 and r["ldl"] >= 0
        assert r["sass"] > r["mufu"] > 0 and r["mma"] > 0  # its exp2 and its importance dot


@pytest.mark.full
def test_launch_resources_of_the_decode_step():
    # `--decode`: the step's four kernels compile for sm_90 and fit; the importance kernel holds no dot
    # (the gate's partials run in the partials kernel), so it needs less of both than the partials kernel.
    pytest.importorskip("triton.backends.nvidia")
    ((module, (kernels, body)),) = kernel_resources.DECODE_CALLS.items()
    call = "T, HQ, H, D, BATCH = 256, 8, 2, 32, 2\n" + body
    rows = {r["kernel"]: r for r in kernel_resources.launch_resources(module, kernels, call)}
    assert set(rows) == set(kernels)
    assert all(0 < r["shared"] <= kernel_resources.ARCHS[90][1] or r["kernel"] == "_importance_kernel"
               for r in rows.values())
    imp, part = rows["_importance_kernel"], rows["_partials_kernel"]
    assert imp["shared"] < part["shared"]
    if imp["regs"] is not None:
        assert imp["regs"] < part["regs"]


@pytest.mark.full
def test_compressed_and_window_dkdv_tiles_differ_and_do_not_spill():
    # The compressed branch's dk/dv takes 32-row query steps at D = 64 (the window 64): two launches, and
    # the 32-row one spills nothing where the 64-row one does (sm_90).
    pytest.importorskip("triton.backends.nvidia")
    module = "nsa.ops.range_attention"
    kernels, body = kernel_resources.MODEL_CALLS[module]
    rows = [r for r in kernel_resources.launch_resources(module, kernels, "T, HQ, H, D = 1024, 8, 1, 64\n" + body)
            if r["kernel"] == "_range_dkdv_kernel"]
    assert sorted(r["launch"]["BLOCK_M"] for r in rows) == [32, 64]
    compressed = next(r for r in rows if r["launch"]["BLOCK_M"] == 32)
    if compressed["regs"] is not None:
        assert compressed["stl"] == 0 and compressed["ldl"] == 0
