#!/usr/bin/env bash
# Every GPU figure of docs/BENCHMARKS.md in one go, on a machine with 2 GPUs (set RESULTS to collect
# the markdown tables; default ./bench_results). GPU 0 and GPU 1 run different benchmarks at the same
# time; each benchmark times its own baselines on its own card, so no figure is compared across cards.
#   bash scripts/run_all_benchmarks.sh [CORPUS_FILE]
set -u
CORPUS=${1:-.corpus/standin.txt}
RESULTS=${RESULTS:-bench_results}
mkdir -p "$RESULTS"
tmp=$(mktemp -d)
export PYTHONUNBUFFERED=1

# 1. DDP on both GPUs: a short run of the quick NSA config.
timeout 150 torchrun --standalone --nproc_per_node 2 train.py --config configs/quick_nsa.yaml \
  data.source=file data.path="$CORPUS" log.wandb_mode=disabled train.max_steps=60 train.eval_every=30 \
  train.sample_every=0 train.out_dir="$tmp/ddp" 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tail -6 > "$RESULTS/torchrun.log"

# 2. Kernel checks and benchmarks, two streams in parallel.
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 100 python3 -m pytest -q -m gpu tests/test_topn_kernel.py tests/test_decode_kernel.py 2>&1 | tail -4
  OUT=$tmp/layer timeout 240 python3 scripts/bench_layer.py --T 16384 65536 --no-flex --mem-T 131072 2>&1 | tail -12
  OUT=$tmp/kernels timeout 230 python3 scripts/bench_kernels.py --T 16384 65536 --small-T 65536 --small-HQ 4 8 16 64 2>&1 | tail -12
) > "$RESULTS/gpu0.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  OUT=$tmp/gen timeout 300 python3 scripts/bench_generate.py --modes cuda_graph compile 2>&1 | tail -12
  OUT=$tmp/train timeout 260 python3 scripts/bench_train.py --T 512 2048 8192 32768 --iters 5 2>&1 | tail -12
  OUT=$tmp/train_compiled timeout 400 python3 scripts/bench_train.py --compile --iters 5 2>&1 | tail -12
) > "$RESULTS/gpu1.log" 2>&1 &
wait
mkdir -p $tmp/layer $tmp/kernels $tmp/gen $tmp/train $tmp/train_compiled
cp $tmp/layer/*.md $tmp/kernels/*.md $tmp/gen/*.md $tmp/train/*.md "$RESULTS/" 2>/dev/null
cp $tmp/train_compiled/bench_train.md "$RESULTS/bench_train_compiled.md" 2>/dev/null
ls "$RESULTS"
