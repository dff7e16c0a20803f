"""Loggers for code that runs inside vLLM processes.

vLLM configures handlers only for its own "vllm" logger tree, so a plain
`logging.getLogger("vllm_llmd...")` inside `vllm serve` prints nothing. Naming our loggers
under "vllm." makes them use vLLM's handlers, format and `VLLM_LOGGING_LEVEL`.
"""

from __future__ import annotations

import logging


def get_logger(module_name: str) -> logging.Logger:
    """Logger for a module that runs in a vLLM process (pass `__name__`)."""
    return logging.getLogger(f"vllm.{module_name}")
