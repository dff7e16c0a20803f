"""The test and benchmark harness's own rules for a `vllm serve` child (devtools/server.py)."""

from __future__ import annotations

import pytest

from vllm_llmd.devtools.server import parse_cores


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
