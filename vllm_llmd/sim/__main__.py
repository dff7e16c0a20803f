"""`python -m vllm_llmd.sim`: the `vllm-llmd-sim` command."""

import sys

from vllm_llmd.sim.cli import main

sys.exit(main())
