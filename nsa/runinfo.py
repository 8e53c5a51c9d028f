"""Where a run's numbers came from: code version, library versions and GPU, recorded with every run
(config.yaml, each checkpoint, the wandb config) so a curve can be traced back to the code."""

import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _git(root, *args):
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_info(device=None, root=REPO):
    """{git_commit, git_dirty, torch, triton, cuda, gpu}: None for what does not apply (not a git
    checkout, no Triton, a CPU build of torch, a CPU device). git_dirty: tracked files differ from
    the commit (untracked files, such as run directories, do not count)."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    device = torch.device(device) if device is not None else None
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "torch": str(torch.__version__),  # a str subclass that the safe checkpoint loader refuses
        "triton": _version("triton") or _version("pytorch-triton"),  # nightly torch ships the latter
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
    }
