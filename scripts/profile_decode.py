"""Where one cached decode step's GPU time goes: kernels per step of the NSA model vs its dense twin.

Batch 1, the enwik8 configs' models with random weights in bf16, a cache of --context tokens filled to
its last --steps positions, the step torch.compile'd (as `generate.py --compile` runs it) or eager.
As in generation, only the steps whose token finishes a compressed block run the compression (one
in compress_stride: --steps 16 holds one). Profiles --steps steps launched eagerly, so the GPU times
per kernel are those of a graphed step but the gaps between kernels (what a CUDA graph removes) are
not counted. Needs a CUDA GPU.

    python scripts/profile_decode.py                    # compiled, 8k context
    python scripts/profile_decode.py --eager --rows 40
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nsa.cache import ModelCache  # noqa: E402
from nsa.config import load_config  # noqa: E402
from nsa.generation import cast_model  # noqa: E402
from nsa.model import Transformer  # noqa: E402
from nsa.ops.common import completes_block  # noqa: E402


def profile_step(name, args):
    cfg = load_config(ROOT / f"configs/enwik8_{name}.yaml").model
    cfg.nsa.backend = "triton"
    torch.manual_seed(0)
    model = cast_model(Transformer(cfg).cuda(), torch.bfloat16).eval()
    cache = ModelCache(model, 1, args.context)
    prompt = torch.randint(0, 256, (1, args.context - args.steps - 4), device="cuda")
    fn = model.decode_step if args.eager else torch.compile(model.decode_step)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    finishes = [completes_block(prompt.shape[1] + i, cfg.nsa.compress_block, cfg.nsa.compress_stride)
                for i in range(args.steps)]
    with torch.no_grad():
        model.prefill(prompt, cache)
        saved = cache.lengths.clone()
        for compress in (True, False, True, False):  # compile both variants and warm up, then rewind the cache
            fn(tok, cache, compress)
            cache.lengths.copy_(saved)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for compress in finishes:
                fn(tok, cache, compress)
            torch.cuda.synchronize()
    us, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us[e.name] += e.device_time_total / args.steps
            count[e.name] += 1
    total, kernels = sum(us.values()), sum(count.values()) / args.steps
    lines = [f"{name}: {kernels:.0f} kernels and {total:.1f} us of GPU time per step ({cfg.depth} layers)"]
    for k, v in sorted(us.items(), key=lambda kv: -kv[1])[: args.rows]:
        lines.append(f"  {v:8.2f} us  {count[k] / args.steps:5.1f}x  {k[:90]}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--eager", action="store_true", help="profile the eager step instead of the compiled one")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_decode.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, context {args.context}, "
          f"{'eager' if args.eager else 'compiled'} step")
    for name in ("nsa", "dense"):
        print(profile_step(name, args), flush=True)


if __name__ == "__main__":
    main()
