"""`vllm-llmd-router check --pod URL [--pod URL ...] [router flags]`: what the router would find.

Per pod, one line per check, each OK, WARN or FAIL:

- reachable: `GET /health` answers 200 (else why not: connection refused, a timeout, a status);
- model: the served model, from `GET /v1/models`;
- cache config: block size and hash algorithm from `vllm:cache_config_info` (its `/metrics`),
  against the router's: its --block-size / --hash-algorithm, else the first pod's, which the
  router adopts (`TokenProcessor.adopt_pod_settings`; in --pod order here);
- tokens (with --tokenizer): the pod's /tokenize agrees with the router's tokens
  (`pod_verification.verify_against_pod`, as the router checks a pod before it follows it);
- KV events: the pod's endpoints (`events=` of --pod, else `GET /kv_event_sources`, read by
  `events/sources.py`), and whether a subscription receives anything within --check-timeout-s
  (a replay endpoint hands over what the pod published so far).

vLLM says nothing of a P/D side channel over HTTP (prefill pods name it in the
`kv_transfer_params` of each answer), so it is not checked. Exit status: 0 without FAIL, 1 with
one, 2 on a usage error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO, cast

import aiohttp

from vllm_llmd.events.__main__ import silence_warning
from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.events.sources import BadEventSources, discover_event_endpoints
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.transport import Transport
from vllm_llmd.hashing import DEFAULT_HASH_ALGORITHM
from vllm_llmd.router.cli import LOG_FORMAT, token_processor
from vllm_llmd.router.config import PROG, PodSpec, RouterConfig
from vllm_llmd.router.config_parse import build_parser, config_from_args
from vllm_llmd.router.pod_verification import cache_config_info
from vllm_llmd.router.tokens import TokenProcessor

CHECK_TIMEOUT_S = 5.0
# the checks, in the order their lines are printed
ORDER = ("tokenizer", "reachable", "model", "cache config", "tokens", "KV events")


@dataclass
class PodReport:
    """What one pod answered, and the lines said of it so far."""

    spec: PodSpec
    lines: list[tuple[str, str, str]] = field(default_factory=list)  # (status, check, detail)
    reachable: bool = False
    model: str | None = None
    metrics_read: bool = False
    block_size: int | None = None
    algorithm: str | None = None

    def say(self, status: str, check: str, detail: str) -> None:
        self.lines.append((status, check, detail))


def describe(exc: BaseException, timeout_s: float) -> str:
    """Why an HTTP call failed, in words (`connection refused`, not an errno)."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer in {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{exc.host}:{exc.port}"
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused (nothing listens at {where})"
        return f"cannot connect to {where}: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(url, timeout=timeout, allow_redirects=False) as response:
        return response.status, await response.text()


async def probe(
    session: aiohttp.ClientSession, report: PodReport, config: RouterConfig, timeout_s: float
) -> None:
    """The checks that need no other pod: reachable, model, cache config read, KV events."""
    url = report.spec.url
    try:
        status, _ = await _get(session, url + "/health", timeout_s)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        report.say("FAIL", "reachable", f"GET /health: {describe(exc, timeout_s)}")
        return
    report.reachable = True
    role = f" (role {report.spec.role})"
    if status == 200:
        report.say("OK", "reachable", "GET /health answered 200" + role)
    else:
        report.say("FAIL", "reachable", f"GET /health answered {status}: not in rotation" + role)
    try:
        status, text = await _get(session, url + "/v1/models", timeout_s)
        models = [entry["id"] for entry in json.loads(text)["data"]]
        report.model = models[0]
        report.say("OK", "model", ", ".join(models))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        report.say("FAIL", "model", f"GET /v1/models: {describe(exc, timeout_s)}")
    except (ValueError, KeyError, IndexError, TypeError):
        report.say("FAIL", "model", f"GET /v1/models answered {status}, no model in it")
    try:
        status, text = await _get(session, url + "/metrics", timeout_s)
        if status != 200:
            raise ValueError(f"GET /metrics answered {status}")
        report.block_size, report.algorithm = cache_config_info(text)
        report.metrics_read = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        report.say("FAIL", "cache config", f"GET /metrics: {describe(exc, timeout_s)}")
    except ValueError as exc:
        report.say("FAIL", "cache config", str(exc))
    await _check_events(session, report, config, timeout_s)


async def _check_events(
    session: aiohttp.ClientSession, report: PodReport, config: RouterConfig, timeout_s: float
) -> None:
    events, replay = report.spec.events, report.spec.replay
    if events is None:
        try:
            events, replay = await discover_event_endpoints(session, report.spec.url)
        except BadEventSources as exc:
            report.say("FAIL", "KV events", str(exc))
            return
    if events is None:
        report.say(
            "WARN",
            "KV events",
            "none configured (no events= in --pod, none in GET /kv_event_sources): the pod is "
            "routed by load alone; start vLLM with --kv-events-config",
        )
        return
    transport = cast(Transport, config.kv_events_transport)
    try:
        heard, answered, silence = await asyncio.to_thread(
            listen,
            events,
            replay,
            config.events_topic,
            transport,
            timeout_s,
            config.kv_events_curve(),
        )
    except Exception as exc:  # a refused endpoint (ValueError, ZMQError)
        report.say("FAIL", "KV events", f"cannot subscribe to {events}: {exc}")
        return
    where = events + (f" (replay {replay})" if replay else " (no replay endpoint)")
    if heard:
        report.say("OK", "KV events", f"{where}: events received")
    else:
        report.say("WARN" if answered else "FAIL", "KV events", f"{where}: {silence}")


def listen(
    endpoint: str,
    replay: str | None,
    topic: str,
    transport: Transport,
    timeout_s: float,
    curve: CurveClientKeys | None = None,
) -> tuple[int, bool, str]:
    """Subscribe for up to timeout_s: (updates received, the publisher answered, what to say
    of a silence)."""
    subscriber = Subscriber(
        endpoint,
        replay_endpoint=replay,
        topic=topic,
        replay_timeout=min(2.0, timeout_s),
        transport=transport,
        curve=curve,
    )
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            if updates := subscriber.poll(min(0.2, left)):
                return len(updates), True, ""
        waited = round(time.monotonic() - started, 1)
        return 0, subscriber.subscribed, silence_warning(subscriber, endpoint, waited)
    finally:
        subscriber.close()


async def compare_settings(
    session: aiohttp.ClientSession,
    reports: list[PodReport],
    config: RouterConfig,
    tokens: TokenProcessor | None,
) -> None:
    """Each pod's block size and hash algorithm against the router's, in --pod order (the
    router takes what its flags leave open from the first pod that says it), then its tokens."""
    # without a tokenizer the router hashes nothing; said of the pods as adopt_pod_settings would
    size, algorithm = config.block_size, config.hash_algorithm
    for report in (r for r in reports if r.metrics_read):
        said = f"block size {report.block_size}, hash algorithm {report.algorithm}"
        if report.block_size is None:
            report.say("WARN", "cache config", "no vllm:cache_config_info: give --block-size")
            continue
        if tokens is not None:
            try:
                tokens.adopt_pod_settings(report.block_size, report.algorithm)
            except ValueError as exc:
                report.say("FAIL", "cache config", f"{said}: the router cannot hash so: {exc}")
                continue
            size, algorithm = tokens.block_size, tokens.hasher.algorithm
        else:
            size = report.block_size if size is None else size
            algorithm = (
                (report.algorithm or DEFAULT_HASH_ALGORITHM) if algorithm is None else algorithm
            )
        pod_algorithm = report.algorithm or DEFAULT_HASH_ALGORITHM
        if (report.block_size, pod_algorithm) == (size, algorithm):
            report.say("OK", "cache config", f"{said}: as the router's")
        else:
            report.say(
                "FAIL",
                "cache config",
                f"{said}; the router's: block size {size}, hash algorithm {algorithm} "
                "(this pod would be routed by load alone)",
            )
    for report in reports:
        if tokens is not None and report.model is not None:
            verdict = await tokens.verify_against_pod(
                report.spec.url, report.model, session=session
            )
            report.say("OK" if verdict.ok else "FAIL", "tokens", verdict.reason)


async def run_checks(config: RouterConfig, timeout_s: float, out: TextIO) -> int:
    """Check every --pod, print the lines and a summary; 1 if any check failed, else 0."""
    router = PodReport(PodSpec("router"))
    tokens = None
    if config.tokenizer:
        try:
            tokens = token_processor(config)
        except FileNotFoundError as exc:
            router.say("FAIL", "tokenizer", str(exc))
    else:
        router.say("WARN", "tokenizer", "no --tokenizer: every request is routed by load alone")
    reports = [PodReport(spec) for spec in config.pods]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(probe(session, r, config, timeout_s) for r in reports))
        await compare_settings(session, reports, config, tokens)
    counts = {"OK": 0, "WARN": 0, "FAIL": 0}
    for report in (router, *reports):
        for status, check, detail in sorted(report.lines, key=lambda line: ORDER.index(line[1])):
            counts[status] += 1
            print(f"{status:<4} {report.spec.url}  {check}: {detail}", file=out)
    verdict = "FAIL" if counts["FAIL"] else "OK"
    print(
        f"{verdict}: {len(reports)} pods; {counts['OK']} OK, {counts['WARN']} WARN, "
        f"{counts['FAIL']} FAIL",
        file=out,
        flush=True,
    )
    return 1 if counts["FAIL"] else 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """`vllm-llmd-router check`: exit status 0 (no FAIL), 1 (a FAIL), 2 (usage, by argparse)."""
    environ = os.environ
    parser = build_parser(
        environ,
        prog=f"{PROG} check",
        description="Check pods as the router would use them: reachable, served model, "
        "block size and hash algorithm, KV events. One line per check, then a summary.",
    )
    parser.add_argument_group("check").add_argument(
        "--check-timeout-s",
        type=float,
        default=CHECK_TIMEOUT_S,
        help="seconds each HTTP call, and the wait for a pod's KV events, may take "
        f"[default: {CHECK_TIMEOUT_S:g}]",
    )
    args = parser.parse_args(argv)
    config = config_from_args(parser, args, environ)
    if not config.pods:
        parser.error("check needs --pod URL (pods found by --k8s-label-selector are not checked)")
    if args.check_timeout_s <= 0:
        parser.error(f"--check-timeout-s must be > 0, got {args.check_timeout_s}")
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    return asyncio.run(run_checks(config, args.check_timeout_s, out or sys.stdout))
