"""scripts/profile_train.py's CPU part: idle gaps between kernels, kernel totals by full name."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import profile_train  # noqa: E402


def test_idle_gaps_by_the_kernels_around_them():
    # a 0-10, b 12-20 (gap 2 after a), a 20-25 (none), b 30-31 (gap 5 after a): a -> b twice, 7 in all.
    kernels = [("a", 0, 10), ("b", 12, 20), ("a", 20, 25), ("b", 30, 31)]
    assert profile_train.idle_gaps(kernels) == {("a", "b"): [7.0, 2]}


def test_kernel_time_counts_each_device_event_once():
    # A CPU launch event (device time charged to it too, in key_averages) and two kernels out of order.
    def event(name, start, end, device):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    prof = SimpleNamespace(events=lambda: [event("b", 12, 20, cuda), event("launch a", 0, 1, cpu),
                                           event("a", 0, 10, cuda)])
    assert profile_train.device_kernels(prof) == [("a", 0, 10), ("b", 12, 20)]


def test_kernel_totals_by_full_name():
    # Two kernels whose names share a long prefix stay apart; launches are counted.
    long = "triton_poi_fused__to_copy__unsafe_view_add_arange_clone_cos_expand_mul_"
    kernels = [(long + "3", 0, 10), (long + "9", 10, 14), (long + "3", 20, 25)]
    assert profile_train.kernel_totals(kernels) == {long + "3": [15.0, 2], long + "9": [4.0, 1]}
