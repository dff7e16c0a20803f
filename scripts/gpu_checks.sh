#!/usr/bin/env bash
# Every GPU check and benchmark of this repo in one run, for a lent GPU machine (Python 3.12,
# torch with CUDA, no vLLM, no network). Prepare here, then run there with the wheels carried:
#
#   bash scripts/gpu_checks.sh --fetch-wheels       # here: msgspec, pyzmq, pytest for py3.12
#   run(command="bash scripts/gpu_checks.sh", carry=[".cache/gpu-wheels"])   # there
#
# What it runs: every CUDA test (copy kernels against plain indexing, the ops' CUDA paths, the
# P/D side channel's CUDA IPC path between two processes), the kernels' correctness sweep, and
# the copy benchmark (kernels vs torch on the same buffers, ratios printed).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.cache/gpu-wheels

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    msgspec pyzmq pytest -d "$WHEELS"
  exit 0
fi

python3 -c "import msgspec, zmq, pytest" 2>/dev/null ||
  python3 -m pip install -q --no-index --find-links "$WHEELS" msgspec pyzmq pytest
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

status=0
python3 -m pytest -q -p no:cacheprovider -rs tests/test_copy_kernels.py tests/test_ops.py \
  tests/test_cuda_ipc.py tests/test_cuda_ipc_checks.py || status=$?
python3 benchmarks/bench_copy_kernels.py --check || status=$?
python3 benchmarks/bench_copy_kernels.py || status=$?
exit "$status"
