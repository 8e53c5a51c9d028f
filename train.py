"""Train a byte-level NSA (or dense) Transformer.

    python train.py --config configs/quick_nsa.yaml [section.key=value ...]
    python train.py --resume runs/quick_nsa [train.max_steps=2000]
    torchrun --standalone --nproc_per_node 2 train.py --config configs/enwik8_nsa.yaml

Writes to train.out_dir: config.yaml (the resolved config, headed by the run's code and library
versions), metrics.jsonl (one JSON object per log line), ckpt.pt (latest checkpoint), and wandb
files when log.wandb_mode is not disabled. Config, data and checkpoint are all checked before the
directory is touched, so a run that cannot start leaves an earlier run's files as they were.

--resume continues the checkpoint's run: its model, optimizer, RNG and clocks. Overrides may change
train.* and log.* (and data.path, where the same bytes now live); model.* and the rest of data.*
would make a different model or different splits, and are refused. A run stopped during its final
evaluation gets its final figures on resume.

Every metrics record carries elapsed_s (wall seconds since the run started) and train_s (seconds
spent in training steps only: no compile warm-up, evaluation, sampling or checkpointing); both
continue across resumes. tokens_per_s is the throughput of the recent training steps by that clock.
"""

import argparse
import contextlib
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from nsa import metrics
from nsa.analysis import BRANCHES, branch_gates, nsa_layers
from nsa.checkpoint import (CHECKPOINT_NAME, CheckpointError, config_from_checkpoint, load_checkpoint,
                            load_weights, remove_stale_temps, resolve_checkpoint_path, rng_state, save_checkpoint,
                            set_rng_state)
from nsa.config import ConfigError, load_config, to_dict
from nsa.data import (DataError, check_splits, eval_windows, get_batch, iter_eval_batches, load_splits,
                      num_eval_batches)
from nsa.generation import generate
from nsa.model import Transformer, bits_per_byte
from nsa.ops import BackendError, get_ops
from nsa.runinfo import run_info

COMPILE_WARMUP_STEPS = 3  # a compiled process's first steps compile (and may recompile): not training time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--resume", help="checkpoint file or run directory to continue from")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def lr_at(step, t):
    """Linear warm-up from 0 over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, t, fused):
    """AdamW with weight decay on weight matrices only: not on vectors (norms, biases) nor on the
    parameters their modules mark `_no_weight_decay` (embeddings, position embeddings, memory kv)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


@torch.no_grad()
def evaluate(model, data, seq_len, batch_size, starts, device, autocast, rank, world, desc=None):
    """Mean loss (nats per byte) over the windows at `starts`, split across ranks and all-reduced.
    With `desc`, rank 0 shows a progress bar."""
    model.eval()
    mine = starts[rank::world]
    batches = iter_eval_batches(data, seq_len, batch_size, mine, device)
    if desc is not None and rank == 0:
        batches = tqdm(batches, total=num_eval_batches(data, seq_len, batch_size, mine), desc=desc,
                       leave=False, dynamic_ncols=True, file=sys.stderr)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, bytes]
    for x, y in batches:
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp_min(1)).item()


def gate_means(model, data, starts, t, device, autocast):
    """{"gate/LAYER/BRANCH": mean gate} of every NSA layer on the first batch of validation windows
    (nsa.analysis.branch_gates); empty for the dense model."""
    layers = nsa_layers(model)
    if not layers:
        return {}
    x, _ = next(iter_eval_batches(data, t.seq_len, t.batch_size, starts[:t.batch_size], device))
    with autocast:
        gates = branch_gates(model, x)
    return {f"gate/{i}/{b}": g for i, row in zip(layers, gates.tolist()) for b, g in zip(BRANCHES, row)}


def final_figures(model, splits, t, device, autocast, run):
    """Loss and bits per byte over the whole val and test splits (every byte predicted once), with a
    progress bar: on a large split this can take longer than training did."""
    out = {}
    for name in ("val", "test"):
        data = splits[name]
        if len(data) >= 2:
            loss = evaluate(model, data, t.seq_len, t.batch_size, eval_windows(data, t.seq_len), device, autocast,
                            run.rank, run.world, desc=f"final {name}")
            out[f"final/{name}_loss"], out[f"final/{name}_bpb"] = loss, bits_per_byte(loss)
    return out


def sample(model, prompt, length, device, seed):
    """A sample at temperature 1 from a fixed seed, through the cached decoding of nsa.generation.
    In fp32 without autocast: the caches take the weights' dtype, and the decode kernels want one
    dtype for queries and caches."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(prompt.encode("utf-8")) or [10]], dtype=torch.long, device=device)
    out, _ = generate(model, idx, length, generator=g)
    model.train()
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


# ---- setup: processes, config, device, data (nothing on disk is touched here)


def processes():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return argparse.Namespace(ddp=world > 1, rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                              world=world, master=rank == 0)


def resolve_config(args):
    """-> (cfg, checkpoint dict or None, its path). Fresh: the file + overrides. Resume: the
    checkpoint's config + overrides, written to the checkpoint's directory unless train.out_dir is
    overridden (or --config FILE, whose model and data must then match the checkpoint's)."""
    if not args.config and not args.resume:
        raise SystemExit("error: pass --config FILE (see configs/) or --resume RUN_DIR")
    ckpt = ckpt_path = None
    if args.resume:
        ckpt_path = resolve_checkpoint_path(args.resume)
        ckpt = load_checkpoint(ckpt_path)
        saved = config_from_checkpoint(ckpt, ckpt_path)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        tree = to_dict(saved)
        if not any(o.startswith("train.out_dir=") for o in args.overrides):
            tree["train"]["out_dir"] = str(ckpt_path.parent)  # keep writing where the checkpoint lives
        cfg = load_config(overrides=args.overrides, base=tree)
    if ckpt is not None:
        refuse_resume_changes(saved, cfg)
    return cfg.check_runnable(torch.cuda.is_available()), ckpt, ckpt_path


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def refuse_resume_changes(saved, cfg):
    """A resumed run keeps the checkpoint's model (its weights fit no other) and data splits (its
    curves would change meaning); train.*, log.* and data.path may differ."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    changed = [f"{k} ({old.get(k)!r} -> {v!r})" for k, v in new.items()
               if k.split(".")[0] not in ("train", "log") and k != "data.path" and old.get(k) != v]
    if changed:
        raise ConfigError(f"--resume keeps the checkpoint's model and data, but these differ: {', '.join(changed)} "
                          "(only train.*, log.* and data.path may change; start a new run with --config for the rest)")


def setup_device(t, run):
    """-> (device, use_cuda, dtype name, autocast context); joins the process group under torchrun."""
    if t.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if run.ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{run.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = t.dtype if t.dtype != "auto" else ("bf16" if use_cuda else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    return device, use_cuda, dtype, autocast


def load_data(cfg, run):
    """The splits, checked against train.seq_len; rank 0 loads first, so only one process downloads."""
    if run.master:
        splits = load_splits(cfg.data)
    if run.ddp:
        dist.barrier()
    if not run.master:
        splits = load_splits(cfg.data)
    check_splits(splits, cfg.train.seq_len)
    return splits


def restore(ckpt, ckpt_path, model, optimizer, run):
    """Load a checkpoint's weights, optimizer and RNG state -> (next step, wandb run id, time dict)."""
    if ckpt is None:
        return 0, None, {}
    load_weights(model, ckpt["model"], ckpt_path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt_path}: its optimizer state does not fit this model's optimizer ({e})") from None
    set_rng_state(ckpt["rng"])
    saved_world = (ckpt.get("data") or {}).get("world_size", run.world)
    if run.master and saved_world != run.world:
        print(f"warning: checkpoint was written with {saved_world} processes, resuming with {run.world}: "
              "batches will differ from an uninterrupted run", file=sys.stderr)
    return int(ckpt["step"]), ckpt.get("wandb_run_id"), ckpt.get("time") or {}


def final_logged(metrics_path, step, run):
    """Whether the log already holds the final figures of `step` (rank 0 reads, every rank learns)."""
    done = [False]
    if run.master and metrics_path.exists():
        done[0] = any(r["step"] == step and any(k.startswith("final/") for k in r)
                      for r in metrics.read_records(metrics_path)[0])
    if run.ddp:
        dist.broadcast_object_list(done, src=0)
    return done[0]


# ---- run directory, log, clock


def import_wandb(cfg):
    if cfg.log.wandb_mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: wandb is not installed: pip install wandb, or pass log.wandb_mode=disabled") from None
    return wandb


def prepare_run_dir(out_dir, cfg, info, start_step, fresh):
    """Create the directory, write config.yaml, cut metrics.jsonl back to `start_step` (emptied
    when fresh) and remove temp files a killed checkpoint write left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fresh and (out_dir / CHECKPOINT_NAME).exists():
        print(f"warning: {out_dir} holds a checkpoint from an earlier run; starting afresh and overwriting "
              f"it (use --resume {out_dir} to continue it instead)", file=sys.stderr)
    remove_stale_temps(out_dir / CHECKPOINT_NAME)
    header = "".join(f"# {k}: {v}\n" for k, v in info.items())
    (out_dir / "config.yaml").write_text("# written by train.py; the run's code and libraries:\n" + header +
                                         yaml.safe_dump(to_dict(cfg), sort_keys=False))
    path = out_dir / "metrics.jsonl"
    if fresh:
        path.write_text("")
        return
    _, bad = metrics.keep_until(path, start_step)
    if bad:
        print(f"warning: {path}: dropped {bad} unreadable line(s) (a write cut off by a kill)", file=sys.stderr)


class Clock:
    """Wall seconds since the run started and seconds spent in training steps, both continued from a
    checkpoint; the steps of a compile warm-up are not counted, and nor is anything between steps."""

    def __init__(self, started, elapsed_s=0.0, train_s=0.0, warmup_steps=0, window=10):
        self.start = started - elapsed_s  # `started`: this process's perf_counter at its start
        self.train_s = train_s
        self.warmup_left = warmup_steps
        self.recent = deque(maxlen=window)  # seconds of the latest counted steps

    def elapsed(self):
        return time.perf_counter() - self.start

    def step_done(self, seconds):
        if self.warmup_left > 0:
            self.warmup_left -= 1
        else:
            self.train_s += seconds
            self.recent.append(seconds)

    def steps_per_s(self):
        """Over the recent counted steps; None before the first."""
        return len(self.recent) / sum(self.recent) if self.recent and sum(self.recent) > 0 else None

    def state(self):
        return {"elapsed_s": self.elapsed(), "train_s": self.train_s}


class RunLog:
    """metrics.jsonl and wandb, rank 0 only; every record gets the clock's elapsed_s and train_s."""

    def __init__(self, path, wandb_run, clock, master):
        self.path, self.wandb_run, self.clock, self.master = path, wandb_run, clock, master

    def __call__(self, record):
        record = {**record, **self.clock.state()}
        if self.master:
            metrics.append(self.path, record)
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        return record


def _peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _cleanup(ddp, wandb_run):
    if wandb_run is not None:
        wandb_run.finish()
    if ddp and dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while another still uses it
        dist.destroy_process_group()


# ---- one training step and its record


def train_step(model, optimizer, data, t, step, run, device, autocast):
    """One optimizer step over grad_accum micro-batches -> (lr, loss, grad norm, finite). A non-finite
    loss or gradient skips the update."""
    lr = lr_at(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(t.grad_accum):
        torch.compiler.cudagraph_mark_step_begin()  # a new CUDA-graph replay (compile_mode); a no-op otherwise
        x, y = get_batch(data, t.batch_size, t.seq_len, seed=t.seed, step=step, rank=run.rank, micro=micro,
                         device=device)
        sync = (not run.ddp) or micro == t.grad_accum - 1  # DDP syncs gradients on the last micro-batch
        with contextlib.nullcontext() if sync else model.no_sync():  # backward must run inside no_sync
            with autocast:
                _, loss = model(x, y)
            (loss / t.grad_accum).backward()
        loss_sum += loss.detach().float()
    loss_avg = loss_sum / t.grad_accum
    if run.ddp:
        dist.all_reduce(loss_avg, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    loss_val, grad_norm_val = loss_avg.item(), grad_norm.item()
    finite = math.isfinite(loss_val) and math.isfinite(grad_norm_val)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, loss_val, grad_norm_val, finite


def train_record(step, lr, loss, grad_norm, nonfinite, tokens_per_step, clock):
    record = {"step": step, "loss": loss, "bpb": bits_per_byte(loss), "lr": lr, "grad_norm": grad_norm,
              "tokens": step * tokens_per_step, "nonfinite": nonfinite}
    if clock.steps_per_s() is not None:  # None while every step so far was compile warm-up
        record["tokens_per_s"] = tokens_per_step * clock.steps_per_s()
    return record


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    run = processes()

    # ---- config, device, data, model, checkpoint state: every check before the run directory
    cfg, ckpt, ckpt_path = resolve_config(args)
    t = cfg.train
    device, use_cuda, dtype, autocast = setup_device(t, run)
    if cfg.model.attention == "nsa":
        get_ops(cfg.model.nsa.backend, device)  # a backend that cannot run here fails now, not at step 1
    splits = load_data(cfg, run)
    train_data, val_data, test_data = splits["train"], splits["val"], splits["test"]
    torch.manual_seed(t.seed)
    raw_model = Transformer(cfg.model).to(device)
    optimizer = make_optimizer(raw_model, t, fused=use_cuda)
    start_step, wandb_run_id, saved_time = restore(ckpt, ckpt_path, raw_model, optimizer, run)
    out_dir = Path(t.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if start_step > t.max_steps or (start_step == t.max_steps and final_logged(metrics_path, start_step, run)):
        _cleanup(run.ddp, None)
        raise SystemExit(f"error: the checkpoint is at step {start_step} and train.max_steps={t.max_steps}: nothing "
                         f"to do (pass train.max_steps=N with N > {start_step} to train further)")
    wandb = import_wandb(cfg) if run.master else None

    compiled = t.compile is True or (t.compile == "auto" and use_cuda)
    graphed = compiled and use_cuda and t.compile_mode == "reduce-overhead"
    if graphed and run.ddp:
        _cleanup(run.ddp, None)
        raise SystemExit("error: train.compile_mode=reduce-overhead runs in one process only (DDP's gradient "
                         "hooks are not graphed): use train.compile_mode=default with torchrun")
    model = torch.compile(raw_model, mode="reduce-overhead" if graphed else None) if compiled else raw_model
    if run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.local_rank] if use_cuda else None)

    # ---- run directory, metrics log, wandb (rank 0 only)
    info = run_info(device)
    wandb_run = None
    if run.master:
        prepare_run_dir(out_dir, cfg, info, start_step, fresh=ckpt is None)
        if wandb is not None:  # the same wandb run id across resumes
            wandb_run = wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name or out_dir.name,
                                   config={**to_dict(cfg), "run_info": info}, dir=str(out_dir),
                                   mode=cfg.log.wandb_mode, id=wandb_run_id, resume="allow")
            wandb_run_id = wandb_run.id
    clock = Clock(started, saved_time.get("elapsed_s", 0.0), saved_time.get("train_s", 0.0),
                  warmup_steps=COMPILE_WARMUP_STEPS if compiled else 0, window=max(t.log_every, 10))
    log = RunLog(metrics_path, wandb_run, clock, run.master)

    def checkpoint(step):
        if run.master:
            save_checkpoint(out_dir / CHECKPOINT_NAME, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng": rng_state(), "data": {"seed": t.seed, "step": step, "world_size": run.world},
                "time": clock.state(), "config": to_dict(cfg), "run_info": info, "wandb_run_id": wandb_run_id,
            })

    if run.master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"model: {cfg.model.attention}, {n_params / 1e6:.2f}M parameters; device {device} x{run.world}, {dtype}"
              f"{', compiled' if compiled else ''}; train {len(train_data):,} / val {len(val_data):,} / test "
              f"{len(test_data):,} bytes; steps {start_step} -> {t.max_steps}; out_dir {out_dir}", file=sys.stderr)

    # ---- the loop
    val_starts = eval_windows(val_data, t.seq_len, t.eval_batches * t.batch_size)  # fixed validation slice
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * run.world
    nonfinite = peak = 0
    pbar = tqdm(total=t.max_steps, initial=start_step, dynamic_ncols=True, desc="train") if run.master else None
    for step in range(start_step, t.max_steps):
        began = time.perf_counter()
        lr, loss, grad_norm, finite = train_step(model, optimizer, train_data, t, step, run, device, autocast)
        clock.step_done(time.perf_counter() - began)
        done = step + 1
        if not finite:
            nonfinite += 1
            if run.master:
                pbar.write(f"step {done}: non-finite loss {loss} / grad norm {grad_norm}, update skipped "
                           f"({nonfinite}/{t.max_nonfinite})")
            log({"step": done, "nonfinite": nonfinite})
            if nonfinite >= t.max_nonfinite:
                if pbar:
                    pbar.close()
                _cleanup(run.ddp, wandb_run)
                raise SystemExit(f"error: stopping after {nonfinite} non-finite steps (train.max_nonfinite="
                                 f"{t.max_nonfinite}); try a lower train.lr or train.grad_clip, or train.dtype=fp32")
        elif run.master and (done % t.log_every == 0 or done == t.max_steps):
            record = log(train_record(done, lr, loss, grad_norm, nonfinite, tokens_per_step, clock))
            pbar.set_postfix(loss=f"{loss:.3f}", bpb=f"{record['bpb']:.3f}", lr=f"{lr:.2e}",
                             tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        if pbar:
            pbar.update(1)

        if t.eval_every and done % t.eval_every == 0 and done != t.max_steps:
            val_loss = evaluate(raw_model, val_data, t.seq_len, t.batch_size, val_starts, device, autocast,
                                run.rank, run.world)
            gates = gate_means(raw_model, val_data, val_starts, t, device, autocast) if run.master else {}
            log({"step": done, "val_loss": val_loss, "val_bpb": bits_per_byte(val_loss), **gates})
            if run.master:
                pbar.write(f"step {done}: val bpb {bits_per_byte(val_loss):.4f}")
        if run.master and t.sample_every and done % t.sample_every == 0:
            peak = max(peak, _peak_bytes(device))  # generate() resets the peak-memory counter
            text = sample(raw_model, t.sample_prompt, t.sample_len, device, seed=t.seed)
            log({"step": done, "sample": text})
            pbar.write(f"step {done} sample: {text!r}")
        if done % t.save_every == 0 and done != t.max_steps:
            checkpoint(done)
    if pbar:
        pbar.close()

    # ---- end: checkpoint, whole-split evaluation (also what a run killed during it resumes to)
    trained = start_step < t.max_steps
    if trained:
        checkpoint(t.max_steps)
    final = {"step": t.max_steps, "tokens": t.max_steps * tokens_per_step}
    if use_cuda and trained:  # peak of the training steps: the whole-split evaluation below allocates less
        final["peak_mem_gib"] = max(peak, _peak_bytes(device)) / 2**30
    final.update(final_figures(raw_model, splits, t, device, autocast, run))
    final = log({**final, **(gate_means(raw_model, val_data, val_starts, t, device, autocast) if run.master else {})})
    if run.master:
        print(" ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith(("final/", "peak"))), file=sys.stderr)
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in final.items() if k != "step"})
    _cleanup(run.ddp, wandb_run)
    return final


def cli(argv=None):
    """Entry point: known failures (bad config, missing data or checkpoint) end with one clear line."""
    try:
        main(argv)
    except (ConfigError, DataError, CheckpointError, BackendError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(cli())
