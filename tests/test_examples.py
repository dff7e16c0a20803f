"""The examples run: GPU script syntax, the workload client, the offload-only example on a
real vLLM CPU server, and the single-box disaggregated demo (`scripts/demo.sh`, the README's
main job) as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vllm_llmd.devtools.server import VLLMServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
WORKLOAD = EXAMPLES / "workload" / "shared_prefix_chat.py"
OFFLOAD = EXAMPLES / "offload_only" / "run.py"
DEMO = EXAMPLES / "single_box_cpu" / "demo.py"
GPU_SCRIPT = EXAMPLES / "single_box_gpu" / "run.sh"
# Same name and config as tests/test_serve.py: one server serves both modules in a session.
CONNECTOR = {"kv_connector": "LLMDConnector", "kv_role": "kv_both"}


# set to a fresh value in each example's environment, which the servers it starts inherit
RUN_TAG = "VLLM_LLMD_EXAMPLE_RUN"


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run an example; whatever it started is gone afterwards. On a timeout the example is
    killed before its own cleanup, and the vLLM servers it started (sessions of their own,
    out of its process group) would outlive it: they are found by the tag in their
    environment."""
    tag = uuid.uuid4().hex
    env = {**os.environ, RUN_TAG: tag}
    try:
        return subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=env,
        )
    finally:
        _kill_tagged(tag)


def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries RUN_TAG=tag (Linux: /proc/PID/environ)."""
    entry = f"{RUN_TAG}={tag}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if entry in environ.split(b"\0"):
            pids.append(int(name))
    return pids


def _kill_tagged(tag: str) -> None:
    if not Path("/proc/self/environ").exists():
        return
    for pid in _tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_example_that_times_out_leaves_nothing_running(tmp_path):
    """What _run promises, with a stand-in example: it starts a process in a session of its
    own (as devtools' VLLMServer does) and hangs."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc")
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "hangs.py"
    script.write_text(
        "import pathlib, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        f"pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        _run([str(script)], timeout=5)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(") ")[1][0]
        except (OSError, IndexError):
            break  # reaped by init: gone
        if state == "Z":  # killed, not yet reaped by init
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the example's child {child} outlived the example")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_run_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(GPU_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = GPU_SCRIPT.read_text()
    # the pieces the README promises: both roles, events, side channel, router, model override
    for needle in ("kv_producer", "kv_consumer", "--kv-events-config", "side_channel_port"):
        assert needle in text, needle
    assert "vllm-llmd-router" in text and "${MODEL:-" in text


def test_gpu_run_script_help_needs_no_gpu():
    result = subprocess.run(
        ["bash", str(GPU_SCRIPT), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "MODEL" in result.stdout and "PREFILL_GPU" in result.stdout


@pytest.mark.server
def test_workload_client_reports_latency_percentiles(vllm_servers, tiny_model, tmp_path):
    server = vllm_servers.shared(
        "tiny-llmd", VLLMServerConfig(model=tiny_model, kv_transfer_config=CONNECTOR)
    )
    report = tmp_path / "report.json"
    argv = [str(WORKLOAD), "--url", server.url, "--conversations", "4", "--system-prompts", "2"]
    argv += ["--system-prompt-words", "200", "--turns", "2", "--concurrency", "2"]
    argv += ["--max-tokens", "8", "--ignore-eos", "--request-rate", "20", "--json", str(report)]
    result = _run(argv, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "requests: 8 succeeded, 0 failed (of 8)" in out, out
    for label in ("TTFT (ms):", "TPOT (ms):", "E2E latency (ms):"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        values = [float(v) for v in re.findall(r"p(?:50|90|99)\s+([\d.]+)", line)]
        # a starved client can read a tiny model's whole stream in one go: TPOT ~ 0 then
        lowest = 0 if label == "TPOT (ms):" else 1e-9
        assert len(values) == 3 and lowest <= values[0] <= values[1] <= values[2], line
    assert re.search(r"request throughput: [\d.]+ req/s", out)
    # the model came from GET /v1/models; every answer had max_tokens tokens
    data = json.loads(report.read_text())
    assert {r["output_tokens"] for r in data["requests"]} == {8}
    assert server.model_name in out


@pytest.mark.server
def test_workload_client_counts_failures(vllm_servers, tiny_model):
    server = vllm_servers.shared(
        "tiny-llmd", VLLMServerConfig(model=tiny_model, kv_transfer_config=CONNECTOR)
    )
    argv = [str(WORKLOAD), "--url", server.url + "/v1", "--model", "no-such-model"]
    argv += ["--conversations", "2", "--turns", "2"]
    result = _run(argv, timeout=60)
    assert result.returncode == 1
    assert "0 succeeded, 4 failed (of 4)" in result.stdout
    assert "HTTP 404" in result.stderr


def test_workload_prompts_are_deterministic_from_the_seed():
    sys.path.insert(0, str(WORKLOAD.parent))
    try:
        import shared_prefix_chat as chat
    finally:
        sys.path.remove(str(WORKLOAD.parent))
    workload = chat.Workload(num_conversations=5, num_system_prompts=2, seed=3)
    first, second = chat.make_conversations(workload), chat.make_conversations(workload)
    assert first == second
    prompts, conversations = first
    assert len(prompts) == 2 and prompts[0] != prompts[1]
    assert conversations[4].messages[0]["content"] == prompts[0]
    other = chat.make_conversations(chat.Workload(num_system_prompts=2, seed=4))[0]
    assert other != prompts
    assert chat.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert chat.percentile([5.0], 99) == 5.0


def test_offload_example_help():
    result = _run([str(OFFLOAD), "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--model", "--host-offload-mib", "--disk-offload-path", "--verbose"):
        assert flag in result.stdout, flag


@pytest.mark.server
def test_offload_example_runs_and_shows_every_tier():
    """The whole example (~35 s on the tiny model): blocks enter and leave every tier."""
    result = _run([str(OFFLOAD)], timeout=300)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert out.count("prompt tokens:") == 12
    loaded = [int(n) for n in re.findall(r"(\d+) loaded from the tiers", out)]
    assert sum(loaded) > 0, out
    for medium in ("GPU", "CPU", "STORAGE"):
        line = next(line for line in out.splitlines() if line.strip().startswith(medium + " "))
        stored, removed = map(int, re.findall(r"Block(?:Stored|Removed)\s+(\d+)", line))
        assert stored > 0 and removed > 0, line
    assert re.search(r"promoted [1-9]", out), out


@pytest.mark.server
def test_the_single_box_demo_moves_the_prompt_then_hits_the_cache():
    """Its two chat turns show what it claims: the first prompt computed on the prefill pod
    and moved to the decode pod by transfer, the second finding the shared system prompt in
    the decode pod's cache."""
    result = _run([str(DEMO)], timeout=600)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert out.count("assistant: ") == 2, out
    routes = re.findall(r"route:\s+prefill=(\S+) -> decode=(\S+)", out)
    assert len(routes) == 2 and routes[0][0] != "-", out  # the first turn went P/D
    prompts = re.findall(
        r"prompt:\s+(\d+) tokens; on the decode pod (\d+) by transfer, (\d+) from its cache, "
        r"(\d+) computed",
        out,
    )
    (total, moved, cached, computed), (total2, moved2, cached2, computed2) = [
        tuple(map(int, p)) for p in prompts
    ]
    assert moved > 0 and moved + cached + computed == total, out
    assert cached2 > 0 and moved2 + cached2 + computed2 == total2, out
