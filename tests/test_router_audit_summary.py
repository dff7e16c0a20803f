"""The router's audit line (format 2) and metrics in vLLM's style, against a real in-process
router before recording pods (router_harness), and `python -m vllm_llmd.router.audit_summary`
on an audit log written here:

- a direct route's line names its `pod`; a P/D route's its `prefill_pod` and `decode_pod`;
  each carries its model, HTTP status and TTFT (streamed answers only), also when it failed;
- a P/D answer names both pods (`X-Routed-To`, `X-Prefilled-By`);
- /metrics is one `llmd:router_*` family, counts what each pod served, has no `_created`;
- `llmd:router_events_subscribed` is 1 only for a followed pod whose events were heard;
- the summary prints per pod requests, share, hit ratio, TTFT percentiles, statuses, P/D share.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from router_harness import MODEL, RecordingPod, metric, read_audit, running_router

from vllm_llmd.router.audit import AUDIT_VERSION
from vllm_llmd.router.audit_summary import main, percentile, read_records, summarize
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.metrics import RouterMetrics
from vllm_llmd.router.pods import PodRegistry

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: Any = None
) -> tuple[int, Any]:
    async with session.post(url + "/v1/completions", json=body, headers=headers) as response:
        await response.read()
        return response.status, response.headers


def _completion(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **extra}


def test_audit_lines_name_the_pods_status_and_ttft(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"

    async def run() -> None:
        pod = await RecordingPod().start()
        try:
            flags = ["--pod", pod.url, "--audit-log", str(audit)]
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                assert (await _post(s, url, _completion()))[0] == 200
                assert (await _post(s, url, _completion(stream=True)))[0] == 200
                pod.status = 500
                assert (await _post(s, url, _completion(stream=True)))[0] == 500
                text = await (await s.get(url + "/metrics")).text()
                assert "_created" not in text
                assert "llmd_router" not in text
                assert await metric(s, url, "llmd:router_routed_total", pod=pod.url) == 2
                assert await metric(s, url, "llmd:router_requests_total", status="500") == 1
        finally:
            await pod.stop()

    asyncio.run(run())
    plain, streamed, failed = read_audit(audit)
    for record in (plain, streamed, failed):
        assert record["v"] == AUDIT_VERSION
        assert record["kind"] == "direct" and record["pod"] == record["served_pod"]
        assert "decode_pod" not in record and "prefill_pod" not in record
        assert record["model"] == MODEL and record["path"] == "/v1/completions"
        # the decision comes after the arrival and before the answer ends
        assert 0 < record["routed_s"] <= record["latency_s"]
        assert record["queued_s"] <= record["routed_s"]
    assert (plain["status"], plain["ttft_s"], plain["stream"]) == (200, None, False)
    assert streamed["status"] == 200 and streamed["ttft_s"] >= 0 and streamed["stream"]
    assert streamed["routed_s"] <= streamed["ttft_s"] <= streamed["latency_s"]
    assert (failed["status"], failed["ttft_s"]) == (500, None)


def test_a_pd_answer_names_both_pods(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"

    async def run() -> tuple[str, str]:
        decode, prefill = await RecordingPod().start(), await RecordingPod().start()
        prefill.answer = {"choices": [{"text": "x"}], "kv_transfer_params": {"k": 1}}
        target = prefill.url.removeprefix("http://")
        flags = ["--pod", f"{decode.url},role=decode", "--prefill-allowlist", target]
        flags += ["--audit-log", str(audit)]
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                status, headers = await _post(
                    s, url, _completion(), {"x-prefiller-host-port": target}
                )
                assert status == 200
                assert headers["X-Routed-To"] == decode.url
                assert headers["X-Prefilled-By"] == prefill.url
                routed = "llmd:router_routed_total"
                assert await metric(s, url, routed, pod=prefill.url, role="prefill") == 1
                assert await metric(s, url, routed, pod=decode.url, role="decode") == 1
                assert await metric(s, url, routed, role="both") == 0
                prefill.status, prefill.answer = 503, {"error": {"message": "busy"}}
                status, _ = await _post(s, url, _completion(), {"x-prefiller-host-port": target})
                assert status == 503  # the prefill pod's error, passed through
        finally:
            await decode.stop()
            await prefill.stop()
        return prefill.url, decode.url

    prefill_url, decode_url = asyncio.run(run())
    record, failed = read_audit(audit)
    assert record["kind"] == "pd" and record["prefilled"] is True
    assert (record["prefill_pod"], record["decode_pod"]) == (prefill_url, decode_url)
    assert "pod" not in record and record["status"] == 200
    assert record["served_pod"] == decode_url
    assert 0 < record["prefill_s"] <= record["latency_s"]  # the prefill step's share
    # failed before any pod's answer was relayed: audited all the same, with its status
    assert (failed["kind"], failed["status"], failed["ttft_s"]) == ("pd", 503, None)
    assert (failed["served_pod"], failed["prefilled"], failed["prefill_s"]) == (None, False, None)


class _FakeIngestor:
    def __init__(self, live: set[str]) -> None:
        self.live = live
        self.on_gap = None

    def live_pods(self) -> set[str]:
        return self.live

    def stats(self) -> dict[str, dict[str, Any]]:
        return {}


def test_events_subscribed_is_one_only_for_a_followed_pod_that_was_heard() -> None:
    pods = ["http://a:1", "http://b:1", "http://c:1"]
    config = parse_config([arg for pod in pods for arg in ("--pod", pod)])
    ingestor = _FakeIngestor({"http://a:1", "http://c:1"})
    registry = PodRegistry(config.pods, ingestor)  # type: ignore[arg-type]
    registry.pods["http://a:1"].subscribed = True  # followed, heard from
    registry.pods["http://b:1"].subscribed = True  # followed, silent
    # c: heard before, but not followed now (out of rotation)
    metrics = RouterMetrics()
    metrics.event_gap("http://a:1")
    metrics.event_gap("http://a:1")
    metrics.refresh(registry, None)
    text = metrics.render().decode()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith(("llmd:router_events_subscribed", "llmd:router_event_gaps"))
    }
    assert values['llmd:router_events_subscribed{pod="http://a:1"}'] == 1
    assert values['llmd:router_events_subscribed{pod="http://b:1"}'] == 0
    assert values['llmd:router_events_subscribed{pod="http://c:1"}'] == 0
    assert values['llmd:router_event_gaps_total{pod="http://a:1"}'] == 2
    assert "# TYPE llmd:router_event_gaps_total counter" in text
    assert "_created" not in text


# ---- the summary ---------------------------------------------------------------------------


def _write_log(path: Path) -> None:
    def direct(pod: str, status: int, ttft: float | None, hit: int) -> dict[str, Any]:
        return {
            "v": 2,
            "ts": 1000.0,
            "kind": "direct",
            "pod": pod,
            "status": status,
            "ttft_s": ttft,
            "prompt_tokens": 100,
            "hit_tokens": hit,
        }

    records = [
        direct("A", 200, 0.1, 100),
        direct("A", 200, 0.2, 0),
        direct("A", 500, None, 50),
        {
            "v": 2,
            "ts": 1001.0,
            "kind": "pd",
            "prefill_pod": "P",
            "decode_pod": "B",
            "status": 200,
            "ttft_s": 0.4,
            "prompt_tokens": 200,
            "hit_tokens": 0,
        },
        # format 1: no "v", every pod named decode_pod, no status
        {"ts": 999.0, "decode_pod": "B", "prefill_pod": None, "prompt_tokens": None},
    ]
    lines = [json.dumps(r) for r in records] + ["not json", "[1, 2]"]
    path.write_text("\n".join(lines) + "\n")


def test_summary_counts_per_pod(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write_log(log)
    with open(log) as f:
        records, skipped = read_records(f)
    summary = summarize(records, skipped)
    assert (summary.total, summary.skipped) == (5, 2)
    a, b, p = summary.pods["A"], summary.pods["B"], summary.pods["P"]
    assert (a.requests, a.pd_requests, dict(a.statuses)) == (3, 0, {"200": 2, "500": 1})
    assert a.mean_hit_ratio == 0.5 and a.ttfts == [0.1, 0.2]
    assert (b.requests, b.pd_share, dict(b.statuses)) == (2, 0.5, {"200": 1, "?": 1})
    assert (p.requests, p.prefill_requests, p.pd_share) == (1, 1, 1.0)
    assert percentile([0.1, 0.2, 0.3, 0.4], 50) == 0.2
    assert percentile([0.1, 0.2, 0.3, 0.4], 95) == 0.4
    assert percentile([], 50) is None


def test_summary_prints_a_table_and_plots_when_it_can(tmp_path: Path, capsys: Any) -> None:
    log = tmp_path / "audit.jsonl"
    _write_log(log)
    assert main([str(log)]) == 0
    out = capsys.readouterr().out
    header, first = out.splitlines()[:2]
    for column in ("requests", "share", "hit ratio", "TTFT p50", "TTFT p95", "P/D", "statuses"):
        assert column in header
    assert first.split()[:3] == ["A", "3", "60.0%"] and "200:2 500:1" in first
    assert "5 requests, 2 lines skipped" in out

    assert main([str(tmp_path / "missing.jsonl")]) == 1


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_summary_plots_a_png(tmp_path: Path) -> None:
    log, png = tmp_path / "audit.jsonl", tmp_path / "decisions.png"
    _write_log(log)
    assert main([str(log), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_summary_without_matplotlib_says_so(tmp_path: Path, capsys: Any, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import raises ImportError
    log, png = tmp_path / "audit.jsonl", tmp_path / "decisions.png"
    _write_log(log)
    assert main([str(log), "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert "A " in captured.out  # the table is printed all the same
    assert "pip install matplotlib" in captured.err and not png.exists()
