"""The router's configuration: one dataclass, built from the command line or the environment.

Every flag `--some-flag` can also be set as `VLLM_LLMD_ROUTER_SOME_FLAG` (the flag wins).
`--pod` is repeatable; in the environment, separate pods with whitespace.

A pod is `URL[,role=both|prefill|decode][,events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]`.
Without `events`, the router asks the pod's `GET /kv_event_sources` (vLLM's own discovery).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

ENV_PREFIX = "VLLM_LLMD_ROUTER_"
ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class PodSpec:
    """A pod as configured (static list) or discovered."""

    url: str
    role: str = "both"
    events: str | None = None
    replay: str | None = None

    @property
    def pod_id(self) -> str:
        return self.url

    @classmethod
    def parse(cls, text: str) -> PodSpec:
        """`URL[,role=...][,events=...][,replay=...]` -> PodSpec; ValueError names the fault."""
        url, *options = [part.strip() for part in text.split(",")]
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"pod {text!r}: the URL must start with http:// or https://")
        values: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("role", "events", "replay"):
                raise ValueError(f"pod {text!r}: unknown option {option!r} (role, events, replay)")
            values[key] = value
        role = values.get("role", "both")
        if role not in ROLES:
            raise ValueError(f"pod {text!r}: role must be one of {ROLES}, got {role!r}")
        return cls(url.rstrip("/"), role, values.get("events"), values.get("replay"))


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs; see `build_parser` for each field's meaning."""

    pods: tuple[PodSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "kv_aware"
    tokenizer: str | None = None
    block_size: int = 128
    hash_algorithm: str = "sha256"
    hash_seed: str | None = None
    events_topic: str = "kv"
    pd_threshold_tokens: int = 256
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    request_timeout_s: float = 600.0
    poll_interval_s: float = 1.0
    audit_log: str | None = None
    audit_prompts: bool = False
    index_max_entries: int = 1_000_000
    redis_url: str | None = None
    no_ingest: bool = False
    prefill_allowlist: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    """The router's CLI; each flag's default comes from its environment variable."""
    parser = argparse.ArgumentParser(
        prog="vllm-llmd-router",
        description="KV-cache-aware, load-aware, disaggregation-aware OpenAI proxy for vLLM.",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT).",
    )
    add = parser.add_argument
    add(
        "--pod",
        action="append",
        default=None,
        metavar="URL[,role=R][,events=E][,replay=P]",
        help="a vLLM pod (repeatable); role both|prefill|decode",
    )
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8000, help="port to listen on")
    add(
        "--policy",
        default="kv_aware",
        help="routing policy: round_robin, load, prefix, kv_aware (prefix hit and load)",
    )
    add(
        "--tokenizer",
        default=None,
        help="local path of the model's tokenizer (needed by prefix-aware policies)",
    )
    add("--block-size", type=int, default=128, help="the pods' KV block size in tokens")
    add("--hash-algorithm", default="sha256", help="the pods' --prefix-caching-hash-algo")
    add("--hash-seed", default=None, help="the pods' PYTHONHASHSEED, if they set one")
    add("--events-topic", default="kv", help="topic of the pods' KV events")
    add(
        "--pd-threshold-tokens",
        type=int,
        default=256,
        help="prompts with more uncached tokens go prefill -> decode when both roles exist",
    )
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' from clients")
    add("--max-body-bytes", type=int, default=8 << 20, help="largest request body accepted")
    add("--request-timeout-s", type=float, default=600.0, help="timeout of one upstream request")
    add("--poll-interval-s", type=float, default=1.0, help="pod health and load poll interval")
    add("--audit-log", default=None, help="append one JSON line per routing decision here")
    add("--audit-prompts", action="store_true", help="include prompt text in the audit log")
    add("--index-max-entries", type=int, default=1_000_000, help="in-memory index bound (blocks)")
    add(
        "--prefill-allowlist",
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="sidecar mode: prefill targets an upstream gateway may name in the "
        "x-prefiller-host-port / x-prefiller-url headers (besides the --pod prefill pods); "
        "a header naming any other target is refused with 403",
    )
    add("--redis-url", default=None, help="share the block index through Redis (redis://...)")
    add(
        "--no-ingest",
        action="store_true",
        help="with --redis-url: read the shared index but follow no pod's KV events (another "
        "replica does; each pod must have exactly one ingesting replica)",
    )
    return parser


def _env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value is None:
            continue
        if action.dest == "pod":
            action.default = value.split()
        elif isinstance(action, argparse._StoreTrueAction):
            action.default = value.lower() in ("1", "true", "yes", "on")
        else:
            action.default = action.type(value) if action.type else value


def parse_config(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> RouterConfig:
    """Parse flags (and environment variables) into a RouterConfig."""
    parser = build_parser()
    _env_defaults(parser, dict(os.environ if environ is None else environ))
    args = parser.parse_args(argv)
    if not args.pod:
        parser.error("give at least one --pod (or VLLM_LLMD_ROUTER_POD)")
    if args.no_ingest and not args.redis_url:
        parser.error("--no-ingest needs --redis-url: another replica fills the shared index")
    try:
        pods = tuple(PodSpec.parse(text) for text in args.pod)
    except ValueError as exc:
        parser.error(str(exc))
    values = {k: v for k, v in vars(args).items() if k != "pod"}
    return RouterConfig(pods=pods, **values)
