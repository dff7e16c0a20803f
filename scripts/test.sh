#!/usr/bin/env bash
# Set the machine up (idempotent) and run the whole test suite. `.ci/run` calls exactly this.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k serve -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy  # the checked set is [tool.mypy] files in pyproject.toml
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
