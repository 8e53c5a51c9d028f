"""Checkpoints: one dict written with torch.save, atomically (temp file + os.replace).

Keys written by train.py:
  model         state_dict of the bare Transformer (unwrapped from DDP / torch.compile)
  optimizer     AdamW state_dict (the learning rate is a pure function of step: no scheduler state)
  step          optimizer steps completed (the next step to run)
  rng           {"torch": CPU RNG state, "cuda": [per-device states] or None, "python": random's state}
  data          {"seed", "step", "world_size"}: batches are a pure function of these (nsa/data.py)
  time          {"elapsed_s", "train_s"}: wall and pure-training seconds so far, continued on resume
  config        nsa.config.to_dict(cfg), the resolved config
  run_info      nsa.runinfo.run_info(): code version, library versions and GPU of the writing process
  wandb_run_id  so a resumed run continues the same wandb run
Only "model" and "config" are required by `load_checkpoint` / `model_from_checkpoint`; older
checkpoints may carry keys no longer written (such as "scheduler"), which are ignored.
"""

import os
import random
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "ckpt.pt"


class CheckpointError(RuntimeError):
    """Missing or unreadable checkpoint; the message names the file."""


def resolve_checkpoint_path(path):
    """A checkpoint file, or a run directory holding `ckpt.pt`."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"no checkpoint at {path}: a directory without {CHECKPOINT_NAME} "
                                  "(pass a checkpoint file or a run directory)")
        path = path / CHECKPOINT_NAME
        if path.is_dir():
            raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def remove_stale_temps(path):
    """Delete the temp files a killed `save_checkpoint` of `path` left behind."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}-*.tmp"):
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, state):
    """torch.save `state` to `path` atomically: a failed or interrupted write leaves the old file intact
    (and its temp file is removed then, or by the next save if the process was killed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict (file or run directory); CheckpointError if missing or corrupt."""
    path = resolve_checkpoint_path(path)
    try:
        # Only tensors, numbers, strings and containers are stored, so the safe loader suffices.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own message is many lines and suggests weights_only=False: not for us
        raise CheckpointError(f"{path} is not a readable checkpoint: truncated, corrupt or not written by "
                              f"train.py ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an nsa checkpoint (no 'model' / 'config' entries)")
    return state


def config_from_checkpoint(state, path="checkpoint"):
    """The checkpoint's Config; CheckpointError when this version of nsa cannot read it."""
    from nsa.config import Config, ConfigError, from_dict

    try:
        return from_dict(Config, state["config"]).validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not fit this version of nsa: {e}") from None


def load_weights(model, weights, path="checkpoint"):
    """Load a checkpoint's model state_dict into `model`; CheckpointError naming the first mismatches."""
    weights = {_strip_wrapper_prefix(k): v for k, v in weights.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(p.shape)}" for k, p in expected.items()
             if k in weights and weights[k].shape != p.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: weights do not match its config's model (missing: {_short(missing)}; "
                              f"unexpected: {_short(unexpected)}; shape: {_short(wrong)})")
    model.load_state_dict(weights)
    return model


def model_from_checkpoint(path, device="cpu"):
    """Rebuild the Transformer from a checkpoint's config and weights -> (model in eval mode, Config).

    A config this version cannot read, or weights that do not fit the config's model, raise
    CheckpointError naming the first mismatches."""
    from nsa.model import Transformer

    state = load_checkpoint(path, map_location="cpu")
    cfg = config_from_checkpoint(state, path)
    model = load_weights(Transformer(cfg.model), state["model"], path)
    return model.to(device).eval(), cfg


def _strip_wrapper_prefix(key):
    """State-dict keys saved from a DDP- or torch.compile-wrapped model carry these prefixes."""
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _short(names, n=4):
    return "none" if not names else ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def rng_state():
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": _python_state_to_list(random.getstate()),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def _python_state_to_list(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]
