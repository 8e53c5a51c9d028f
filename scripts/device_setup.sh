#!/usr/bin/env bash
# Sourced at the start of every GPU-machine command: install the wheels carried in .whl/ (packages
# the GPU image lacks) into /tmp/site and unpack the byte corpus carried in .corpus/.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -f .corpus/standin-corpus.txt.gz ] && [ ! -f .corpus/standin.txt ]; then
  zcat .corpus/standin-corpus.txt.gz > .corpus/standin.txt
fi
