"""docs/configuration.md is generated from the code and kept in step with it."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.router.config_parse import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gen_config_reference.py"
DOC = REPO_ROOT / "docs" / "configuration.md"


@functools.cache
def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_configuration_md_is_up_to_date():
    assert _generator().render() == DOC.read_text(), (
        "docs/configuration.md is stale: run python scripts/gen_config_reference.py"
    )


def test_check_mode_passes_on_the_committed_file():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_every_connector_key_is_documented_with_type_default_and_meaning():
    text = DOC.read_text()
    entries = {e.name: e for e in _generator().connector_entries()}
    for f in dataclasses.fields(LLMDConnectorConfig):
        assert f"| `{f.name}` |" in text, f.name
        entry = entries[f.name]
        assert entry.type == type(f.default).__name__
        # the description comes from the comment above the field: none may be missing
        assert len(entry.description) > 10, f"{f.name}: add a comment above the field"


def test_every_router_flag_is_documented():
    text = DOC.read_text()
    flags = [
        option
        for action in build_parser()._actions
        if action.dest != "help"
        for option in action.option_strings
    ]
    assert "--pod" in flags and "--tokenizer" in flags
    for flag in flags:
        assert f"`{flag}`" in text, flag
    for entry in _generator().router_entries():
        assert entry.description, f"{entry.name} has no help text"
        assert entry.env.startswith("VLLM_LLMD_ROUTER_")


def test_field_comments_read_only_the_block_above_each_field():
    @dataclasses.dataclass
    class Sample:
        # ---- a group header ----

        # first line
        # second line
        a: int = 1
        b: str = ""  # trailing comments are not the documentation
        # about c
        c: bool = False

    comments = _generator().field_comments(Sample)
    assert comments == {"a": "first line second line", "b": "", "c": "about c"}
