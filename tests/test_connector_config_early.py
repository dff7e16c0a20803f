"""A bad `kv_connector_extra_config` stops `vllm serve` in its API-server process, with one
clear line, before any engine starts or weights load (issue #26).

The plugin validates the config when vLLM resolves the connector class while building VllmConfig
(vllm_llmd/plugin.py); without that, the same typo surfaced only in the engine core after the
model loaded, repeated across a long log.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port, llmd_connector

pytestmark = pytest.mark.server

LOG_DIR = Path(__file__).resolve().parents[1] / "logs" / "tests"
HINT = (
    "unknown kv_connector_extra_config key(s) ['host_ofload_bytes'] "
    "(did you mean 'host_offload_bytes'?)"
)
# What vLLM CPU logs once an engine exists or a model starts to load.
ENGINE_MARKS = ("(EngineCore", "Starting to load model", "Loading weights", "Model loading took")


def test_misspelled_key_fails_in_the_api_server_before_weights_load(tiny_model):
    config = VLLMServerConfig(
        model=tiny_model,
        port=free_port(),
        kv_transfer_config=llmd_connector(extra={"host_ofload_bytes": 64 << 20}),
    )
    server = VLLMServer(config, LOG_DIR / "config-early-typo.log").start()
    assert server.process is not None
    started = time.monotonic()
    try:
        returncode = server.process.wait(timeout=180)
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    log = server.log_text()
    tail = server.log_tail(30)

    assert returncode != 0, tail
    assert HINT in log, tail
    lines = [line for line in log.splitlines() if "did you mean 'host_offload_bytes'" in line]
    assert 1 <= len(lines) <= 2, lines
    for mark in ENGINE_MARKS:
        assert mark not in log, f"{mark!r} in the log: the check ran too late\n{tail}"
    assert elapsed < 120, f"took {elapsed:.0f}s"
