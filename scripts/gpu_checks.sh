#!/usr/bin/env bash
# Every GPU check and benchmark of this repo in one run, for a lent GPU machine (Python 3.12,
# torch with CUDA, no vLLM, no network), ending in one table (benchmarks/gpu_report.py).
# Prepare here, then run there with the wheels carried:
#
#   bash scripts/gpu_checks.sh --fetch-wheels       # here: msgspec, pyzmq, blake3 for py3.12
#   run(command="bash scripts/gpu_checks.sh", carry=[".cache/gpu-wheels"])   # there
#   bash scripts/gpu_checks.sh --cpu                # here: the same run on the CPU, small sizes
#
# What it runs:
# - every CUDA test: the copy kernels against plain indexing, the ops' CUDA paths, CUDA IPC
#   between two processes, and the worker half's byte paths through the GPU harness
#   (vllm_llmd/devtools/worker_harness.py: P/D pulls by CUDA IPC, shared memory and socket,
#   offload stores, spills and loads through pinned host memory and disk, the shared tier's
#   chunk staging) in the attention backends' layouts, bf16/fp16/fp8, blocks of 16 and 64;
# - the kernels' correctness sweep over every layout;
# - the benchmarks, each against a baseline of the same run: the kernels against the link,
#   one copy_ per block and torch's batched path; pulls against a device copy; offload
#   store and load against the pinned link.
# Results go to $OUT (the device tool brings it back) or a temporary folder; exit 1 if a test
# failed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.cache/gpu-wheels

# What the GPU image lacks (it has torch, pytest and NVRTC; none of these need others).
PACKAGES=(msgspec pyzmq blake3)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$WHEELS" "${PACKAGES[@]}"
  exit 0
fi
QUICK=()
PYTHON=python3
OUT=${OUT:-$(mktemp -d)}
if [[ "${1:-}" == "--cpu" ]]; then  # a dry run of the whole pipeline where no GPU is
  QUICK=(--quick --device cpu)
  PYTHON=${PYTHON_FOR_CHECKS:-.venv/bin/python}
  # as on the GPU machines: no vLLM (a test module that needs it fails here too)
  PYTHONPATH=. "$PYTHON" -m vllm_llmd.devtools.vllm_stand_in --hide-in "$OUT/no-vllm"
  export PYTHONPATH="$OUT/no-vllm${PYTHONPATH:+:$PYTHONPATH}"
fi

SITE=/tmp/llmd-gpu-site  # --target: the image's Python is not ours to install into
if ! "$PYTHON" -c "import msgspec, zmq, blake3" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$OUT/tests.xml" "$OUT/rows.jsonl" "$OUT/log"
[[ -n "${QUICK[*]}" ]] || nvidia-smi -L
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Each step has a time budget (the device tool allows 10 minutes a call): one that hangs is cut,
# counted as failed, and the others still run; all output also goes to $OUT/log.
export PYTHONUNBUFFERED=1
status=0
step() {
  local budget=$1
  shift
  echo "== $* (at most ${budget}s)" | tee -a "$OUT/log"
  local rc=0
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$OUT/log" || rc=$?
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "== TIMED OUT after ${budget}s: $*" | tee -a "$OUT/log"
  fi
  [[ $rc -eq 0 ]] || status=$rc
}
step 240 "$PYTHON" -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT/tests.xml" \
  tests/test_copy_kernels.py tests/test_ops.py tests/test_cuda_ipc.py \
  tests/test_cuda_ipc_checks.py tests/test_worker_byte_paths.py
if [[ -z "${QUICK[*]}" ]]; then
  step 60 "$PYTHON" benchmarks/bench_copy_kernels.py --check
fi
step 100 "$PYTHON" benchmarks/bench_copy_kernels.py --block-sizes 16 64 \
  --json "$OUT/rows.jsonl" "${QUICK[@]}"
step 100 "$PYTHON" benchmarks/bench_gpu_paths.py --json "$OUT/rows.jsonl" "${QUICK[@]}"
title="GPU checks: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU dry run)")')"
"$PYTHON" benchmarks/gpu_report.py "$OUT/tests.xml" "$OUT/rows.jsonl" --title "$title" |
  tee "$OUT/report.md" || status=$?
exit "$status"
