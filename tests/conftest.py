"""Test-wide setup. Triton kernels run in the interpreter on CPU: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_range_outputs(monkeypatch):
    """The range-attention kernels' outputs start as NaN, so an element a kernel forgets to write fails
    the comparison."""
    from nsa.ops import range_attention

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(range_attention, "_empty", empty)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than with two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
