"""The test and benchmark harness's own rules for a `vllm serve` child (devtools/server.py)."""

from __future__ import annotations

import pytest

from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, parse_cores


@pytest.mark.parametrize(
    ("spec", "cores"),
    [("0", {0}), ("1", {1}), ("0-3", {0, 1, 2, 3}), ("0,2", {0, 2}), ("0-1|4-5", {0, 1, 4, 5})],
)
def test_cores_are_read_as_vllm_binds_them(spec: str, cores: set[int]) -> None:
    assert parse_cores(spec) == cores


@pytest.mark.parametrize("spec", ["nobind", "", "0-", "a,1", "1-x"])
def test_a_spec_that_names_no_cores_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="expected cores"):
        parse_cores(spec)


def test_a_server_kept_on_no_cores_is_refused_before_it_starts(tmp_path) -> None:
    config = VLLMServerConfig(
        model=tmp_path / "model", cpu_cores="nobind", whole_server_on_cores=True
    )
    server = VLLMServer(config, tmp_path / "server.log")
    with pytest.raises(ValueError, match="expected cores"):
        server.start()
    assert server.process is None  # nothing left running
