"""Sample text from a trained checkpoint.

    python generate.py --checkpoint runs/enwik8_nsa/ckpt.pt --prompt "The " --max-new-tokens 500
    python generate.py --checkpoint ckpt.pt --prompt-file prompt.txt --greedy --compile

Bytes in, bytes out: the prompt is UTF-8 encoded, the output decoded with errors='replace'. The
prompt is run through the model once (prefill, filling preallocated caches), then one cached decode
step per new token (`--no-cache`: the full forward each step instead, for comparison). Prints the
text of each sample, then prefill time, decode tokens/s and peak GPU memory.
"""

import argparse
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate bytes from an nsa checkpoint.")
    p.add_argument("--checkpoint", required=True, help="path of a checkpoint written by train.py")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (UTF-8); default: a newline")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file (raw bytes)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature, >= 0; 0 means greedy (the same as --greedy)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely bytes, k >= 0 (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (1.0: off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1,
                   help="sequences generated together as one batch (one cache), each sampled on its own")
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward each step")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (fuses its small ops; graphed on GPU)")
    p.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph (cuda only)")
    p.add_argument("--max-context", type=int, default=0,
                   help="longest prompt accepted (default: the checkpoint's train.seq_len)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "flex", "triton"],
                   help="override the checkpoint's nsa.backend")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from nsa.checkpoint import CheckpointError
    from nsa.generation import generate, load_model
    from nsa.ops import BackendError

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.max_new_tokens < 1:
        return fail("--max-new-tokens must be at least 1")
    if args.num_samples < 1:
        return fail("--num-samples must be at least 1")
    if not args.temperature >= 0:  # also NaN
        return fail(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_k < 0:
        return fail(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        return fail(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.max_context < 0:
        return fail(f"--max-context must be >= 0 (0: the checkpoint's train.seq_len), got {args.max_context}")
    device = _device(args.device)
    if device is None:
        return fail(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device {args.device} but CUDA is not available")
    if args.cuda_graph and device.type != "cuda":
        return fail(f"--cuda-graph needs a CUDA device; --device {args.device} is {device.type}")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                prompt = f.read()
        except OSError as e:
            return fail(f"cannot read --prompt-file: {e}")
    else:
        prompt = ("\n" if args.prompt is None else args.prompt).encode("utf-8")
    if not prompt:
        return fail("the prompt is empty: give at least one byte")

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model, cfg = load_model(args.checkpoint, device, dtype)
    except CheckpointError as e:
        return fail(str(e))
    if args.backend is not None:
        cfg.model.nsa.backend = args.backend  # the one NSAConfig every layer of the model reads
    context = args.max_context or cfg.train.seq_len
    if len(prompt) > context:
        return fail(f"the prompt has {len(prompt)} bytes, longer than the model context of {context} "
                    f"(the checkpoint's train.seq_len; raise it with --max-context)")
    if len(prompt) + args.max_new_tokens > context:
        print(f"note: prompt + new tokens ({len(prompt) + args.max_new_tokens}) run past the trained context "
              f"({context})", file=sys.stderr)

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device)[None].repeat(args.num_samples, 1)
    try:
        out, stats = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, greedy=args.greedy, generator=gen, use_cache=not args.no_cache,
                              compile=args.compile, cuda_graph=args.cuda_graph)
    except BackendError as e:
        return fail(str(e))
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(bytes(row).decode("utf-8", errors="replace"))
    mem = stats["peak_mem_bytes"]
    print(f"\n[{cfg.model.attention}, {device}, {str(dtype).removeprefix('torch.')}, "
          f"{'no cache' if args.no_cache else 'cached'}] prompt {len(prompt)} bytes, "
          f"prefill {stats['prefill_ms']:.1f} ms, "
          f"decode {stats['tokens_per_s']:.1f} tokens/s ({args.max_new_tokens} x {args.num_samples}), "
          f"peak memory {'n/a (cpu)' if mem is None else f'{mem / 2**20:.0f} MiB'}")
    return 0


def _device(name):
    """torch.device of --device (auto: cuda when available), or None for anything but cpu and cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        return None
    return device if device.type in ("cpu", "cuda") else None


if __name__ == "__main__":
    sys.exit(main())
