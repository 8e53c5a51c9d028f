#!/usr/bin/env bash
# Sourced at the start of every GPU-machine command: install the wheels carried in .whl/ (packages
# the GPU image lacks) into /tmp/site and unpack the byte corpus carried in .corpus/.
# Both folders are git-ignored; make them once on a machine with PyPI access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform any -d .whl rotary-embedding-torch==0.9.1 \
#     fla-core==0.6.0 native-sparse-attention-pytorch==0.2.3 einx frozendict local-attention==1.11.2 \
#     hyper-connections==0.4.11 torch-einops-utils==0.2.0
#   mkdir -p .corpus && cp ../shared/data/standin-corpus.txt.gz .corpus/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -f .corpus/standin-corpus.txt.gz ] && [ ! -f .corpus/standin.txt ]; then
  zcat .corpus/standin-corpus.txt.gz > .corpus/standin.txt
fi
