"""nsa.runinfo.run_info: the commit and dirtiness of a git checkout, library versions, no GPU on CPU."""

import shutil
import subprocess

import pytest
import torch

from nsa.runinfo import run_info


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_and_dirty_flag(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    head = head.stdout.strip()
    info = run_info(root=tmp_path)
    assert info["git_commit"] == head and info["git_dirty"] is False
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "metrics.jsonl").write_text("{}\n")  # untracked output: still clean
    assert run_info(root=tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert run_info(root=tmp_path)["git_dirty"] is True


def test_outside_a_checkout_and_on_cpu(tmp_path):
    info = run_info("cpu", root=tmp_path)
    assert info["git_commit"] is None and info["git_dirty"] is None
    assert info["torch"] == torch.__version__ and type(info["torch"]) is str  # the safe loader refuses TorchVersion
    assert info["cuda"] == torch.version.cuda and info["gpu"] is None
    assert set(info) == {"git_commit", "git_dirty", "torch", "triton", "cuda", "gpu"}
