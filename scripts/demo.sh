#!/usr/bin/env bash
# Set the machine up (idempotent) and run the single-box demo (examples/single_box_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/single_box_cpu/demo.py "$@"
