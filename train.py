"""Train a byte-level NSA (or dense) Transformer.

    python train.py --config configs/quick_nsa.yaml [section.key=value ...]
    python train.py --resume runs/quick_nsa [train.max_steps=2000]
    torchrun --standalone --nproc_per_node 2 train.py --config configs/enwik8_nsa.yaml

Writes to train.out_dir: config.yaml (the resolved config), metrics.jsonl (one JSON object per
log line), ckpt.pt (latest checkpoint), and wandb files when log.wandb_mode is not disabled.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from nsa.checkpoint import (CheckpointError, config_from_checkpoint, load_checkpoint, resolve_checkpoint_path,
                            rng_state, save_checkpoint, set_rng_state)
from nsa.config import ConfigError, load_config, to_dict
from nsa.data import DataError, eval_windows, get_batch, iter_eval_batches, load_splits
from nsa.generation import generate
from nsa.model import Transformer, bits_per_byte
from nsa.ops import BackendError


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
    """AdamW with weight decay on weight matrices only (not norms, biases, embeddings, position
    embeddings or memory key/values)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_matrix = p.dim() >= 2 and "embed" not in name and leaf not in ("pos", "mem_kv")
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


@torch.no_grad()
def evaluate(model, data, seq_len, batch_size, starts, device, autocast, rank, world):
    """Mean loss (nats per byte) over the windows at `starts`, split across ranks and all-reduced."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, bytes]
    for x, y in iter_eval_batches(data, seq_len, batch_size, starts[rank::world], device):
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp_min(1)).item()


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


def main(argv=None):
    args = parse_args(argv)

    # ---- distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    master = rank == 0

    # ---- config: file + overrides, or the checkpoint's config + overrides on --resume
    ckpt = None
    if args.resume:
        ckpt_path = resolve_checkpoint_path(args.resume)
        ckpt = load_checkpoint(ckpt_path)
    if args.config:
        if not Path(args.config).is_file():
            raise SystemExit(f"error: config file {args.config} does not exist")
        cfg = load_config(args.config, args.overrides)
    elif ckpt is not None:
        tree = config_from_checkpoint(ckpt)
        if not any(o.startswith("train.out_dir=") for o in args.overrides):
            tree.train.out_dir = str(ckpt_path.parent)  # keep writing where the checkpoint lives
        cfg = load_config(overrides=args.overrides, base=to_dict(tree))
    else:
        raise SystemExit("error: pass --config FILE (see configs/) or --resume RUN_DIR")
    t = cfg.train

    # ---- device and precision
    if t.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if ddp:
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = t.dtype if t.dtype != "auto" else ("bf16" if use_cuda else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    # ---- data (rank 0 first, so only one process downloads)
    if master:
        splits = load_splits(cfg.data)
    if ddp:
        dist.barrier()
    if not master:
        splits = load_splits(cfg.data)
    train_data, val_data, test_data = splits["train"], splits["val"], splits["test"]

    # ---- model, optimizer
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = make_optimizer(model, t, fused=use_cuda)
    start_step, wandb_run_id = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
        wandb_run_id = ckpt.get("wandb_run_id")
        saved_world = (ckpt.get("data") or {}).get("world_size", world)
        if master and saved_world != world:
            print(f"warning: checkpoint was written with {saved_world} processes, resuming with {world}: "
                  "batches will differ from an uninterrupted run", file=sys.stderr)
    raw_model = model
    if t.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    n_params = sum(p.numel() for p in raw_model.parameters())

    # ---- run directory, metrics log, wandb (rank 0 only)
    out_dir = Path(t.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    wandb_run = None
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None and (out_dir / "ckpt.pt").exists():
            print(f"warning: {out_dir} holds a checkpoint from an earlier run; starting afresh and overwriting "
                  f"it (use --resume {out_dir} to continue it instead)", file=sys.stderr)
        with open(out_dir / "config.yaml", "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        _truncate_metrics(metrics_path, start_step)
        if cfg.log.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise SystemExit("error: wandb is not installed: pip install wandb, or pass log.wandb_mode=disabled")
            wandb_run = wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name or out_dir.name,
                                   config=to_dict(cfg), dir=str(out_dir), mode=cfg.log.wandb_mode,
                                   id=wandb_run_id, resume="allow")
            wandb_run_id = wandb_run.id

    def log(record):
        if not master:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def checkpoint(step):
        if master:
            save_checkpoint(out_dir / "ckpt.pt", {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "step": step},
                "step": step,
                "rng": rng_state(),
                "data": {"seed": t.seed, "step": step, "world_size": world},
                "config": to_dict(cfg),
                "wandb_run_id": wandb_run_id,
            })

    if master:
        print(f"model: {cfg.model.attention}, {n_params / 1e6:.2f}M parameters; device {device} x{world}, {dtype}; "
              f"train {len(train_data):,} / val {len(val_data):,} / test {len(test_data):,} bytes; "
              f"steps {start_step} -> {t.max_steps}; out_dir {out_dir}", file=sys.stderr)

    if start_step >= t.max_steps:
        _cleanup(ddp, wandb_run)
        raise SystemExit(f"error: the checkpoint is at step {start_step} and train.max_steps={t.max_steps}: nothing "
                         f"to do (pass train.max_steps=N with N > {start_step} to train further)")

    # ---- the loop
    val_starts = eval_windows(val_data, t.seq_len, t.eval_batches * t.batch_size)  # fixed validation slice
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    nonfinite = 0
    pbar = None
    if master:
        from tqdm import tqdm

        pbar = tqdm(total=t.max_steps, initial=start_step, dynamic_ncols=True, desc="train")
    t0 = time.perf_counter()
    for step in range(start_step, t.max_steps):
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward / backward over grad_accum micro-batches; DDP syncs gradients on the last one
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            x, y = get_batch(train_data, t.batch_size, t.seq_len, seed=t.seed, step=step, rank=rank,
                             micro=micro, device=device)
            sync = (not ddp) or micro == t.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync():  # backward must run inside no_sync
                with autocast:
                    _, loss = model(x, y)
                (loss / t.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_avg = loss_sum / t.grad_accum
        if ddp:
            dist.all_reduce(loss_avg, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        loss_val, grad_norm_val = loss_avg.item(), grad_norm.item()

        # a non-finite loss or gradient: no update, count it, give up after max_nonfinite
        finite = math.isfinite(loss_val) and math.isfinite(grad_norm_val)
        if finite:
            optimizer.step()
        else:
            nonfinite += 1
            if master:
                pbar.write(f"step {step + 1}: non-finite loss {loss_val} / grad norm {grad_norm_val}, "
                           f"update skipped ({nonfinite}/{t.max_nonfinite})")
            log({"step": step + 1, "nonfinite": nonfinite})
            if nonfinite >= t.max_nonfinite:
                if pbar:
                    pbar.close()
                _cleanup(ddp, wandb_run)
                raise SystemExit(f"error: stopping after {nonfinite} non-finite steps (train.max_nonfinite="
                                 f"{t.max_nonfinite}); try a lower train.lr or train.grad_clip, or train.dtype=fp32")
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if master and finite and (done % t.log_every == 0 or done == t.max_steps):
            elapsed = time.perf_counter() - t0
            record = {"step": done, "loss": loss_val, "bpb": bits_per_byte(loss_val), "lr": lr,
                      "grad_norm": grad_norm_val, "tokens_per_s": tokens_per_step * (done - start_step) / elapsed,
                      "tokens": done * tokens_per_step, "nonfinite": nonfinite}
            for layer, gates in raw_model.gate_means().items():
                for branch, g in zip(("cmp", "slc", "win"), gates.tolist()):
                    record[f"gate/{layer}/{branch}"] = g
            log(record)
            pbar.set_postfix(loss=f"{loss_val:.3f}", bpb=f"{record['bpb']:.3f}", lr=f"{lr:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        if pbar:
            pbar.update(1)

        if t.eval_every and done % t.eval_every == 0 and done != t.max_steps:
            val_loss = evaluate(raw_model, val_data, t.seq_len, t.batch_size, val_starts, device, autocast, rank, world)
            log({"step": done, "val_loss": val_loss, "val_bpb": bits_per_byte(val_loss)})
            if master:
                pbar.write(f"step {done}: val bpb {bits_per_byte(val_loss):.4f}")
        if master and t.sample_every and done % t.sample_every == 0:
            text = sample(raw_model, t.sample_prompt, t.sample_len, device, seed=t.seed)
            log({"step": done, "sample": text})
            pbar.write(f"step {done} sample: {text!r}")
        if done % t.save_every == 0 and done != t.max_steps:
            checkpoint(done)
    if pbar:
        pbar.close()

    # ---- end: checkpoint, whole-split evaluation
    checkpoint(t.max_steps)
    final = {"step": t.max_steps}
    if use_cuda:  # peak of the training steps: the whole-split evaluation below allocates less
        final["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for name, data in (("val", val_data), ("test", test_data)):
        if len(data) >= 2:
            loss = evaluate(raw_model, data, t.seq_len, t.batch_size, eval_windows(data, t.seq_len), device,
                            autocast, rank, world)
            final[f"final/{name}_loss"], final[f"final/{name}_bpb"] = loss, bits_per_byte(loss)
    log(final)
    if master:
        print(" ".join(f"{k}={v:.4f}" for k, v in final.items() if k != "step"), file=sys.stderr)
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in final.items() if k != "step"})
    _cleanup(ddp, wandb_run)
    return final


def _truncate_metrics(path, start_step):
    """Fresh run: empty the log. Resume from step s: keep only lines up to s (a crashed run may have
    logged steps past its last checkpoint; the resumed run logs them again)."""
    if start_step == 0 or not path.exists():
        path.write_text("")
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= start_step]
    path.write_text("".join(line + "\n" for line in keep))


def _cleanup(ddp, wandb_run):
    if wandb_run is not None:
        wandb_run.finish()
    if ddp and dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while another still uses it
        dist.destroy_process_group()


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
