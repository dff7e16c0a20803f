"""llm-d's KV-source header (`x-kv-cache-source-host-port`) with --pull-from-holders, against a
real in-process router before recording pods: a source the router knows (or allowlists) runs
the P/D first step and the chosen pod pulls from it; an unknown one is refused with 403;
without --pull-from-holders the header is ignored. (The pull itself, between real vLLM pods,
is in test_router_e2e.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from router_harness import MODEL, RecordingPod, read_audit, running_router

SOURCE_HEADER = "x-kv-cache-source-host-port"


async def _ask(url: str, headers: dict[str, str]) -> int:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/completions", json=body, headers=headers) as response,
    ):
        await response.read()
        return response.status


def _run(audit: Path, pull: bool, header_target: str | None) -> tuple[int, str, str]:
    """(worst status, decode pod URL, source pod URL) of two requests naming a KV source."""

    async def run() -> tuple[int, str, str]:
        decode, source = await RecordingPod().start(), await RecordingPod().start()
        source.answer = {"choices": [{"text": "x"}], "kv_transfer_params": {"k": 1}}
        flags = ["--pod", decode.url, "--pod", source.url, "--policy", "round_robin"]
        flags += ["--audit-log", str(audit)] + (["--pull-from-holders"] if pull else [])
        target = header_target or source.url.removeprefix("http://")
        try:
            async with running_router(flags) as (_, url):
                # round robin: one request to each pod
                statuses = [await _ask(url, {SOURCE_HEADER: target}) for _ in range(2)]
        finally:
            await decode.stop()
            await source.stop()
        return max(statuses), decode.url, source.url

    return asyncio.run(run())


def test_a_known_source_runs_the_first_step_and_the_chosen_pod_pulls(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    status, decode, source = _run(audit, pull=True, header_target=None)
    assert status == 200
    records = {record["kind"]: record for record in read_audit(audit)}
    # the request routed to the source itself is served there; the other pulls from it
    assert records["direct"]["pod"] == source
    pulled = records["pd"]
    assert (pulled["prefill_pod"], pulled["decode_pod"]) == (source, decode)
    assert pulled["prefilled"] and pulled["prefill_reason"] == "prefill chosen upstream (header)"


def test_an_unknown_source_is_refused_and_without_the_flag_the_header_is_ignored(
    tmp_path: Path,
) -> None:
    status, *_ = _run(tmp_path / "a.jsonl", pull=True, header_target="10.9.9.9:8000")
    assert status == 403
    assert not (tmp_path / "a.jsonl").exists() or read_audit(tmp_path / "a.jsonl") == []
    status, *_ = _run(tmp_path / "b.jsonl", pull=False, header_target=None)
    assert status == 200
    assert [r["kind"] for r in read_audit(tmp_path / "b.jsonl")] == ["direct", "direct"]
