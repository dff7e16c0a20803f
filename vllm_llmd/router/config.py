"""The router's configuration: one dataclass, built from the command line or the environment.

Every flag `--some-flag` can also be set as `VLLM_LLMD_ROUTER_SOME_FLAG` (the flag wins).
`--pod` is repeatable; in the environment, separate pods with whitespace.

A pod is `URL[,role=both|prefill|decode][,events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]`.
Without `events`, the router asks the pod's `GET /kv_event_sources` (vLLM's own discovery).
Pods can also be discovered in Kubernetes, by label selector (`--k8s-*`, see `router/k8s.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard, get_args

from vllm_llmd.events.transport import TRANSPORTS
from vllm_llmd.router.flags import (
    ENV_PREFIX,
    add_flags,
    flag,
    flag_specs,
    parsed_values,
    unknown_env_vars,
)
from vllm_llmd.router.scoring import PolicyName, ScoringConfig
from vllm_llmd.router.slo import SLO, SLOConfig, parse_model_slo, parse_objective

__all__ = [
    "ENV_PREFIX",
    "ROLES",
    "PodSpec",
    "Role",
    "RouterConfig",
    "build_parser",
    "check_k8s_port",
    "is_role",
    "parse_config",
]

# what a pod does: prefill and decode, or one of the two (P/D)
Role = Literal["both", "prefill", "decode"]
ROLES: tuple[Role, ...] = get_args(Role)
# the fields that only mean something with --k8s-label-selector
K8S_DISCOVERY_FIELDS = (
    "k8s_namespace",
    "k8s_port",
    "k8s_role_label",
    "k8s_kubeconfig",
    "k8s_api_url",
)


@dataclass(frozen=True)
class PodSpec:
    """A pod as configured (static list) or discovered."""

    url: str
    role: Role = "both"
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
        if not is_role(role):
            raise ValueError(f"pod {text!r}: role must be one of {ROLES}, got {role!r}")
        return cls(url.rstrip("/"), role, values.get("events"), values.get("replay"))


def is_role(text: str) -> TypeGuard[Role]:
    return text in ROLES


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs. Each field is a flag, declared once here: its default,
    type and help (`flags.flag`); `build_parser` and docs/configuration.md come from them."""

    pods: tuple[PodSpec, ...] = flag(
        (),
        "a vLLM pod (repeatable); role both|prefill|decode",
        metavar="URL[,role=R][,events=E][,replay=P]",
        name="pod",
    )
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "port to listen on")
    policy: str = flag(
        "kv_aware",
        "routing policy: round_robin, load, prefix, kv_aware (prefix hit and load), "
        "slo (predicted latency against SLOs, with priority and fair queueing)",
    )
    tokenizer: str | None = flag(
        None, "local path of the model's tokenizer (needed by prefix-aware policies)"
    )
    block_size: int | None = flag(
        None,
        "the pods' KV block size in tokens; default: the first pod's (its "
        "vllm:cache_config_info), and a pod that differs is routed by load alone",
    )
    hash_algorithm: str | None = flag(
        None,
        "the pods' --prefix-caching-hash-algo; default: the first pod's (as --block-size), "
        "else sha256",
    )
    hash_seed: str | None = flag(None, "the pods' PYTHONHASHSEED, if they set one")
    events_topic: str = flag("kv", "topic of the pods' KV events")
    kv_events_transport: str = flag(
        "zmtp",
        "how the router speaks to the pods' KV-event sockets: zmtp (our own ZMTP client: every "
        "frame and whole message bounded before it is buffered, a peer that breaks a bound cut "
        "and reconnected with backoff) or zmq (pyzmq; libzmq buffers a multipart message that "
        "never ends without limit: for publishers you trust)",
        metavar="{zmtp,zmq}",
    )
    pd_threshold_tokens: int = flag(
        256, "prompts with more uncached tokens go prefill -> decode when both roles exist"
    )
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY' from clients")
    max_body_bytes: int = flag(8 << 20, "largest request body accepted")
    request_timeout_s: float = flag(600.0, "timeout of one upstream request")
    poll_interval_s: float = flag(1.0, "pod health and load poll interval")
    health_timeout_s: float = flag(
        5.0, "seconds a pod's /health may take before the check counts as timed out"
    )
    health_timeouts_to_evict: int = flag(
        3,
        "timed-out /health checks in a row that take a pod out of rotation (a busy pod on a "
        "loaded host answers late yet serves; a refused or failed check evicts at once)",
    )
    audit_log: str | None = flag(None, "append one JSON line per routing decision here")
    audit_prompts: bool = flag(False, "include prompt text in the audit log")
    index_max_entries: int = flag(1_000_000, "in-memory index bound (blocks)")
    recent_route_ttl_s: float = flag(
        5.0,
        "for this long after routing a prompt to a pod, count its prefix as that pod's "
        "until the pod's KV events say so (a second request on the prefix follows the first); "
        "0 turns it off",
    )
    shared_tier_ttl_s: float = flag(
        300.0,
        "how long a block announced in the shared KV tier (medium SHARED) counts as there "
        "without being announced again (the tier evicts silently)",
    )
    prefill_allowlist: str | None = flag(
        None,
        "sidecar mode: prefill targets an upstream gateway may name in the "
        "x-prefiller-host-port / x-prefiller-url headers (besides the --pod prefill pods); "
        "a header naming any other target is refused with 403",
        metavar="HOST:PORT[,HOST:PORT...]",
    )
    # ---- what clients are trusted with (see router/client_body.py) ----
    trust_client_kv_transfer_params: bool = flag(
        False,
        "forward the kv_transfer_params of client requests (only behind a trusted "
        "upstream that sets them, e.g. llm-d's EPP and sidecar); by default they are removed: "
        "they tell a pod which host to pull KV from into the shared prefix cache",
    )
    trust_request_chat_template: bool = flag(
        False,
        "accept a request's own chat_template (also in chat_template_kwargs) and render "
        "it to tokenize; by default such requests are refused with 400, as vLLM does",
    )
    # ---- blocking work off the event loop (see router/off_loop.py) ----
    tokenize_workers: int = flag(
        4, "threads that tokenize requests (and render chat templates) off the event loop"
    )
    tokenize_timeout_s: float = flag(
        1.0, "a request whose tokenization takes longer is routed by load alone"
    )
    index_timeout_s: float = flag(
        0.5,
        "a request whose index or shared-tier lookup (Redis) takes longer, or fails, is "
        "routed by load alone",
    )
    redis_url: str | None = flag(None, "share the block index through Redis (redis://...)")
    redis_timeout_s: float = flag(
        1.0,
        "with --redis-url: seconds to connect to Redis and for one Redis call; past it the "
        "call fails (requests are then routed by load alone, events wait in their pod's queue)",
    )
    no_ingest: bool = flag(
        False,
        "with --redis-url: read the shared index but follow no pod's KV events (another "
        "replica does; each pod must have exactly one ingesting replica)",
    )
    # ---- load thresholds and SLO-aware routing (see slo_config / scoring_config) ----
    max_waiting: int = flag(
        8,
        "a pod with this many queued requests (its gauge, or the router's in-flight "
        "requests beyond its running batch) is saturated",
    )
    max_kv_usage: float = flag(0.95, "a pod this full (0..1) is saturated")
    w_prefix: float = flag(
        1.0,
        "kv_aware: weight of the cached-prefix score (0..1, tier-weighted share of the "
        "prompt's blocks a pod holds)",
    )
    w_load: float = flag(
        0.5,
        "kv_aware: weight of the load score (0..1, a pod's requests against the busiest "
        "candidate's, or its KV usage); higher spreads conversations more, lower keeps them "
        "on the pod that holds their prefix",
    )
    slo_ttft_ms: float | None = flag(
        None, "default time-to-first-token SLO (a request's x-slo-ttft-ms header wins)"
    )
    slo_tpot_ms: float | None = flag(
        None, "default time-per-output-token SLO (a request's x-slo-tpot-ms header wins)"
    )
    model_slo: tuple[str, ...] = flag(
        (), "SLO defaults of one model (repeatable)", metavar="MODEL:ttft=MS,tpot=MS"
    )
    objective: tuple[str, ...] = flag(
        (),
        "priority of requests naming this x-gateway-inference-objective (repeatable); "
        "negative priorities are sheddable: refused with 429 when no pod meets their SLO",
        metavar="NAME=PRIORITY",
    )
    slo_headroom: float = flag(
        0.1, "policy slo: a pod meets an SLO when predicted <= (1 - headroom) * SLO"
    )
    max_queue: int = flag(
        1024, "policy slo: requests the router may hold while the pool is saturated"
    )
    queue_timeout_s: float = flag(
        30.0, "policy slo: longest wait in the router's queue for a request without a TTFT SLO"
    )
    latency_min_samples: int = flag(
        8, "observations a pod's latency model needs before its predictions are used"
    )
    # ---- Kubernetes pod discovery (on with k8s_label_selector; see router/k8s.py) ----
    k8s_label_selector: str | None = flag(
        None,
        "discover pods in Kubernetes: the ready pods this label selector picks (e.g. "
        "'app=vllm'), watched as they come and go; with or without --pod",
        metavar="SELECTOR",
    )
    k8s_namespace: str | None = flag(
        None, "namespace of the discovered pods (default: the router's own, in a cluster)"
    )
    k8s_port: str = flag(
        "8000",
        "the pods' vLLM port: a number, or the name of a container port",
        metavar="PORT|NAME",
    )
    k8s_role_label: str = flag(
        "llm-d.ai/role",
        "pod label whose value (prefill, decode, both) is the pod's role; none: both",
    )
    k8s_kubeconfig: str | None = flag(
        None,
        "reach the cluster with this kubeconfig (default: the pod's service account)",
        metavar="FILE",
    )
    k8s_api_url: str | None = flag(
        None,
        "reach the Kubernetes API at this URL without credentials (tests, kubectl proxy)",
        metavar="URL",
    )

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


def _k8s_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the --k8s-* flags, or None."""
    if args.k8s_label_selector is None:
        defaults = {f.name: f.default for f in dataclasses.fields(RouterConfig)}
        given = [
            "--" + name.replace("_", "-")
            for name in K8S_DISCOVERY_FIELDS
            if getattr(args, name) != defaults[name]
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


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The router's CLI, generated from RouterConfig's fields; with environ, a flag's
    `VLLM_LLMD_ROUTER_*` variable there is its default."""
    parser = argparse.ArgumentParser(
        prog="vllm-llmd-router",
        description="KV-cache-aware, load-aware, disaggregation-aware OpenAI proxy for vLLM.",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT).",
    )
    add_flags(parser, flag_specs(RouterConfig), environ or {})
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """Parse flags (and environment variables) into a RouterConfig."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if unknown := unknown_env_vars(flag_specs(RouterConfig), environ):
        parser.error(f"environment variables that are no flag's: {'; '.join(unknown)}")
    policies = [name.value for name in PolicyName]
    if args.policy not in policies:
        close = difflib.get_close_matches(args.policy, policies, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"--policy {args.policy!r} is not one of {', '.join(policies)}{hint}")
    if not args.pod and not args.k8s_label_selector:
        parser.error(
            "give at least one --pod (or VLLM_LLMD_ROUTER_POD), or discover pods with "
            "--k8s-label-selector"
        )
    if (k8s_error := _k8s_error(args)) is not None:
        parser.error(k8s_error)
    if args.no_ingest and not args.redis_url:
        parser.error("--no-ingest needs --redis-url: another replica fills the shared index")
    if args.kv_events_transport not in TRANSPORTS:
        parser.error(
            f"--kv-events-transport must be one of {', '.join(TRANSPORTS)}, "
            f"got {args.kv_events_transport!r}"
        )
    for name in ("tokenize_workers", "health_timeouts_to_evict"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in (
        "tokenize_timeout_s",
        "index_timeout_s",
        "redis_timeout_s",
        "shared_tier_ttl_s",
        "health_timeout_s",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    values = parsed_values(flag_specs(RouterConfig), args)
    try:
        values["pods"] = tuple(PodSpec.parse(text) for text in values["pods"])
    except ValueError as exc:
        parser.error(str(exc))
    config = RouterConfig(**values)
    try:
        config.slo_config()
        config.scoring_config()
    except ValueError as exc:
        parser.error(str(exc))
    return config
