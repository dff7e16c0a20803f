"""The router's configuration: one dataclass, built from the command line or the environment.

Every flag `--some-flag` can also be set as `VLLM_LLMD_ROUTER_SOME_FLAG` (the flag wins).
`--pod` is repeatable; in the environment, separate pods with whitespace.

A pod is `URL[,role=both|prefill|decode][,events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]`.
Without `events`, the router asks the pod's `GET /kv_event_sources` (vLLM's own discovery).
Pods can also be discovered in Kubernetes, by label selector (`--k8s-*`, see `router/k8s.py`).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_llmd.router.scoring import ScoringConfig
from vllm_llmd.router.slo import SLO, SLOConfig, parse_model_slo, parse_objective

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
    shared_tier_ttl_s: float = 300.0
    recent_route_ttl_s: float = 5.0
    redis_url: str | None = None
    no_ingest: bool = False
    prefill_allowlist: str | None = None
    # ---- load thresholds and SLO-aware routing (see slo_config / scoring_config) ----
    max_waiting: int = 8
    max_kv_usage: float = 0.95
    w_prefix: float = 1.0
    w_load: float = 0.5
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    model_slo: tuple[str, ...] = ()
    objective: tuple[str, ...] = ()
    slo_headroom: float = 0.1
    max_queue: int = 1024
    queue_timeout_s: float = 30.0
    latency_min_samples: int = 8
    # ---- Kubernetes pod discovery (on with k8s_label_selector; see router/k8s.py) ----
    k8s_namespace: str | None = None
    k8s_label_selector: str | None = None
    k8s_port: str = "8000"
    k8s_role_label: str = "llm-d.ai/role"
    k8s_kubeconfig: str | None = None
    k8s_api_url: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def scoring_config(self) -> ScoringConfig:
        """The policies' knobs; ValueError on a bad value."""
        return ScoringConfig(
            w_prefix=self.w_prefix,
            w_load=self.w_load,
            max_waiting=self.max_waiting,
            max_kv_usage=self.max_kv_usage,
        )

    def slo_config(self) -> SLOConfig:
        """SLO defaults, objectives and queue bounds; ValueError names a bad value."""
        default = SLO(
            None if self.slo_ttft_ms is None else self.slo_ttft_ms / 1000.0,
            None if self.slo_tpot_ms is None else self.slo_tpot_ms / 1000.0,
        )
        return SLOConfig(
            default_slo=default,
            model_slos=dict(parse_model_slo(text) for text in self.model_slo),
            objectives=dict(parse_objective(text) for text in self.objective),
            headroom=self.slo_headroom,
            max_queue=self.max_queue,
            queue_timeout_s=self.queue_timeout_s,
        )


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
        help="routing policy: round_robin, load, prefix, kv_aware (prefix hit and load), "
        "slo (predicted latency against SLOs, with priority and fair queueing)",
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
        "--recent-route-ttl-s",
        type=float,
        default=5.0,
        help="for this long after routing a prompt to a pod, count its prefix as that pod's "
        "until the pod's KV events say so (a second request on the prefix follows the first); "
        "0 turns it off",
    )
    add(
        "--shared-tier-ttl-s",
        type=float,
        default=300.0,
        help="how long a block announced in the shared KV tier (medium SHARED) counts as there "
        "without being announced again (the tier evicts silently)",
    )
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
    # ---- load thresholds and SLO-aware routing ----
    add(
        "--max-waiting",
        type=int,
        default=8,
        help="a pod with this many queued requests (its gauge, or the router's in-flight "
        "requests beyond its running batch) is saturated",
    )
    add("--max-kv-usage", type=float, default=0.95, help="a pod this full (0..1) is saturated")
    add(
        "--w-prefix",
        type=float,
        default=1.0,
        help="kv_aware: weight of the cached-prefix score (0..1, tier-weighted share of the "
        "prompt's blocks a pod holds)",
    )
    add(
        "--w-load",
        type=float,
        default=0.5,
        help="kv_aware: weight of the load score (0..1, a pod's requests against the busiest "
        "candidate's, or its KV usage); higher spreads conversations more, lower keeps them "
        "on the pod that holds their prefix",
    )
    add(
        "--slo-ttft-ms",
        type=float,
        default=None,
        help="default time-to-first-token SLO (a request's x-slo-ttft-ms header wins)",
    )
    add(
        "--slo-tpot-ms",
        type=float,
        default=None,
        help="default time-per-output-token SLO (a request's x-slo-tpot-ms header wins)",
    )
    add(
        "--model-slo",
        action="append",
        default=None,
        metavar="MODEL:ttft=MS,tpot=MS",
        help="SLO defaults of one model (repeatable)",
    )
    add(
        "--objective",
        action="append",
        default=None,
        metavar="NAME=PRIORITY",
        help="priority of requests naming this x-gateway-inference-objective (repeatable); "
        "negative priorities are sheddable: refused with 429 when no pod meets their SLO",
    )
    add(
        "--slo-headroom",
        type=float,
        default=0.1,
        help="policy slo: a pod meets an SLO when predicted <= (1 - headroom) * SLO",
    )
    add(
        "--max-queue",
        type=int,
        default=1024,
        help="policy slo: requests the router may hold while the pool is saturated",
    )
    add(
        "--queue-timeout-s",
        type=float,
        default=30.0,
        help="policy slo: longest wait in the router's queue for a request without a TTFT SLO",
    )
    add(
        "--latency-min-samples",
        type=int,
        default=8,
        help="observations a pod's latency model needs before its predictions are used",
    )
    # ---- Kubernetes pod discovery ----
    add(
        "--k8s-label-selector",
        default=None,
        metavar="SELECTOR",
        help="discover pods in Kubernetes: the ready pods this label selector picks (e.g. "
        "'app=vllm'), watched as they come and go; with or without --pod",
    )
    add(
        "--k8s-namespace",
        default=None,
        help="namespace of the discovered pods (default: the router's own, in a cluster)",
    )
    add(
        "--k8s-port",
        default="8000",
        metavar="PORT|NAME",
        help="the pods' vLLM port: a number, or the name of a container port",
    )
    add(
        "--k8s-role-label",
        default="llm-d.ai/role",
        help="pod label whose value (prefill, decode, both) is the pod's role; none: both",
    )
    add(
        "--k8s-kubeconfig",
        default=None,
        metavar="FILE",
        help="reach the cluster with this kubeconfig (default: the pod's service account)",
    )
    add(
        "--k8s-api-url",
        default=None,
        metavar="URL",
        help="reach the Kubernetes API at this URL without credentials (tests, kubectl proxy)",
    )
    return parser


def _k8s_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the --k8s-* flags, or None."""
    if args.k8s_label_selector is None:
        given = [
            flag
            for flag, value, default in (
                ("--k8s-namespace", args.k8s_namespace, None),
                ("--k8s-port", args.k8s_port, "8000"),
                ("--k8s-role-label", args.k8s_role_label, "llm-d.ai/role"),
                ("--k8s-kubeconfig", args.k8s_kubeconfig, None),
                ("--k8s-api-url", args.k8s_api_url, None),
            )
            if value != default
        ]
        return f"{given[0]} needs --k8s-label-selector" if given else None
    if not args.k8s_label_selector.strip():
        return "--k8s-label-selector is empty: it would pick every pod in the namespace"
    if args.k8s_kubeconfig and args.k8s_api_url:
        return "give --k8s-kubeconfig or --k8s-api-url, not both"
    if args.k8s_api_url and not args.k8s_api_url.startswith(("http://", "https://")):
        return f"--k8s-api-url {args.k8s_api_url!r} must start with http:// or https://"
    if args.k8s_kubeconfig and not os.path.isfile(args.k8s_kubeconfig):
        return f"--k8s-kubeconfig {args.k8s_kubeconfig}: no such file"
    if not args.k8s_role_label.strip():
        return "--k8s-role-label is empty"
    return check_k8s_port(args.k8s_port)


def check_k8s_port(port: str) -> str | None:
    """What is wrong with a --k8s-port value (a number or a container port's name), or None."""
    if port.isdigit():
        return None if 1 <= int(port) <= 65535 else f"--k8s-port {port}: not in 1..65535"
    if re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", port):
        return None
    return (
        f"--k8s-port {port!r}: give a port number or a container port's name "
        "(lowercase letters, digits and dashes, at most 15)"
    )


def _env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value is None:
            continue
        if isinstance(action, argparse._AppendAction):  # --pod, --objective, ...
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
    if not args.pod and not args.k8s_label_selector:
        parser.error(
            "give at least one --pod (or VLLM_LLMD_ROUTER_POD), or discover pods with "
            "--k8s-label-selector"
        )
    if (k8s_error := _k8s_error(args)) is not None:
        parser.error(k8s_error)
    if args.no_ingest and not args.redis_url:
        parser.error("--no-ingest needs --redis-url: another replica fills the shared index")
    if args.shared_tier_ttl_s <= 0:
        parser.error(f"--shared-tier-ttl-s must be > 0, got {args.shared_tier_ttl_s}")
    try:
        pods = tuple(PodSpec.parse(text) for text in args.pod or ())
    except ValueError as exc:
        parser.error(str(exc))
    values = {k: v for k, v in vars(args).items() if k != "pod"}
    values["model_slo"] = tuple(values["model_slo"] or ())
    values["objective"] = tuple(values["objective"] or ())
    config = RouterConfig(pods=pods, **values)
    try:
        config.slo_config()
        config.scoring_config()
    except ValueError as exc:
        parser.error(str(exc))
    return config
