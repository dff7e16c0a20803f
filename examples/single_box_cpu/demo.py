"""Single-box disaggregated demo on CPU: prefill + decode vLLM (LLMDConnector) behind the router.

Starts a prefill vLLM and a decode vLLM on the tiny local model (one core each, KV events on,
the decode with a host offload tier), and `vllm-llmd-router` in front of them. Then it sends
two chat requests that share a long system prompt through the router and prints, for each,
the reply, which pods ran it, and how many prompt tokens came from the decode pod's cache or by
transfer from the prefill pod instead of being computed there.

Run with `scripts/demo.sh` (which sets the machine up first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_llmd.devtools.client import metric_sum, scrape_metrics
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = REPO_ROOT / "logs" / "demo"
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


def pod(model: Path, name: str, role: str, cores: str, extra: dict) -> VLLMServer:
    connector = {
        "kv_connector": "LLMDConnector",
        "kv_role": role,
        "kv_connector_extra_config": extra,
    }
    if role == "kv_consumer":
        connector["kv_load_failure_policy"] = "recompute"
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": "kv",
        "endpoint": f"tcp://*:{free_port()}",
        "replay_endpoint": f"tcp://*:{free_port()}",
    }
    config = VLLMServerConfig(
        model=model,
        served_model_name="llmd-demo",
        cpu_cores=cores,
        kv_transfer_config=connector,
        kv_events_config=events,
    )
    return VLLMServer(config, LOG_DIR / f"{name}.log")


def start_router(prefill: VLLMServer, decode: VLLMServer, model: Path) -> tuple:
    port = free_port()
    audit = LOG_DIR / "router-audit.jsonl"
    audit.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "vllm_llmd.router.cli",
        "--port",
        str(port),
        "--pod",
        f"{prefill.url},role=prefill",
        "--pod",
        f"{decode.url},role=decode",
        "--tokenizer",
        str(model),
        "--pd-threshold-tokens",
        "128",
        "--audit-log",
        str(audit),
    ]
    log = open(LOG_DIR / "router.log", "wb")  # the child keeps it open
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url, audit
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the router did not start; see {LOG_DIR / 'router.log'}")


def chat(url: str, messages: list[dict]) -> tuple[dict, dict]:
    body = json.dumps(
        {"model": "llmd-demo", "messages": messages, "max_tokens": 24, "temperature": 0}
    ).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read()), dict(response.headers)


def token_sources(server: VLLMServer) -> dict[str, float]:
    samples = scrape_metrics(server.url)
    return {s: metric_sum(samples, "vllm:prompt_tokens_by_source_total", source=s) for s in SOURCES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    args = parser.parse_args()

    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")
    prefill = pod(model, "prefill", "kv_producer", "0", {})
    decode = pod(model, "decode", "kv_consumer", "1", {"host_offload_bytes": 256 << 20})
    print(f"starting prefill and decode vLLM with LLMDConnector (logs in {LOG_DIR}) ...")
    started = time.monotonic()
    prefill.start()
    decode.start()
    router = None
    try:
        prefill.wait_ready()
        decode.wait_ready()
        router, router_url, audit = start_router(prefill, decode, model)
        print(
            f"ready after {time.monotonic() - started:.0f}s: prefill {prefill.url}, "
            f"decode {decode.url}, router {router_url}\n"
        )
        system = {"role": "system", "content": sample_text(400, seed=7)}
        for question in ("What is the first rule?", "And the second rule?"):
            before = token_sources(decode)
            answer, headers = chat(router_url, [system, {"role": "user", "content": question}])
            time.sleep(0.5)  # the decode pod's metrics catch up
            moved = {k: int(v - before[k]) for k, v in token_sources(decode).items()}
            record = json.loads(audit.read_text().splitlines()[-1])
            print(f"user:      {question}")
            print(f"assistant: {answer['choices'][0]['message']['content']!r}")
            print(
                f"  route:   prefill={record.get('prefill_pod') or '-'} -> "
                f"decode={headers.get('X-Routed-To')}  "
                f"({record.get('decode_reason') or record.get('reason')})"
            )
            print(
                f"  prompt:  {answer['usage']['prompt_tokens']} tokens; on the decode pod "
                f"{moved['external_kv_transfer']} by transfer, {moved['local_cache_hit']} from "
                f"its cache, {moved['local_compute']} computed\n"
            )
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=10)
        prefill.stop()
        decode.stop()


if __name__ == "__main__":
    main()
