"""The package installs as designed: entry points, shipped kernels, light imports."""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.resources
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for init in (REPO_ROOT / "vllm_llmd").rglob("__init__.py")
    } | {"vllm_llmd.kernels"}
    assert listed == on_disk, f"setup.cfg [options] packages must list exactly {sorted(on_disk)}"


def test_vllm_plugin_entry_point_is_installed():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in plugins if ep.value == "vllm_llmd.plugin:register"]
    assert len(ours) == 1, f"vllm.general_plugins entry points: {list(plugins)}"


def test_kernel_sources_ship_as_package_data():
    files = importlib.resources.files("vllm_llmd.kernels")
    assert files.joinpath("__init__.py").is_file()


def test_plugin_import_is_light():
    # vLLM imports the plugin in every process; it must not drag torch (or CUDA) in.
    code = (
        "import sys, vllm_llmd, vllm_llmd.plugin, vllm_llmd.compat;"
        "heavy = [m for m in ('torch', 'vllm') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
