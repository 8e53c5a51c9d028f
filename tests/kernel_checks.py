"""Comparison helper shared by the range-attention kernel tests (compressed and window branches)."""

import torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def assert_close(got, want, dtype, what):
    """Max error relative to the reference's largest value (at least 1), within the dtype's tolerance;
    any NaN (an element the kernel never wrote, with NaN-poisoned outputs) fails."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not got.isnan().any(), f"{what}: NaN (unwritten or invalid) elements"
    if want.numel() == 0:
        return
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {TOL[dtype]}"
