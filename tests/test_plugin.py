"""The vLLM plugin registers LLMDConnector once, and refuses unsupported vLLM releases."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_llmd.compat import (
    SKIP_CHECK_ENV,
    UnsupportedVLLMVersion,
    check_vllm_version,
    parse_release,
)


def test_register_is_idempotent_and_resolves_the_class():
    # A fresh process: the registry is process-global and vLLM may already have loaded us here.
    code = """
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm_llmd.plugin import register
register(); register()
cls = KVConnectorFactory.get_connector_class_by_name("LLMDConnector")
from vllm_llmd.connector.connector import LLMDConnector
assert cls is LLMDConnector, cls
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_vllm_loads_the_plugin_through_its_entry_point():
    code = """
from vllm.plugins import load_general_plugins
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
load_general_plugins()
assert "LLMDConnector" in KVConnectorFactory._registry
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.1", "v0.33.0rc1"])
def test_supported_versions_pass(version, monkeypatch):
    monkeypatch.delenv(SKIP_CHECK_ENV, raising=False)
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "dev"])
def test_unsupported_versions_fail_with_the_fix(version, monkeypatch):
    monkeypatch.delenv(SKIP_CHECK_ENV, raising=False)
    with pytest.raises(UnsupportedVLLMVersion, match=r"supports vLLM 0\.32\.x, 0\.33\.x") as err:
        check_vllm_version(version)
    assert version in str(err.value) and SKIP_CHECK_ENV in str(err.value)


def test_skip_env_allows_untested_version(monkeypatch):
    monkeypatch.setenv(SKIP_CHECK_ENV, "1")
    check_vllm_version("0.40.0")


def test_installed_vllm_is_supported():
    check_vllm_version()
    assert parse_release("0.32.0+cpu") == (0, 32)
