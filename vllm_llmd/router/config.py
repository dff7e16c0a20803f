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

from vllm_llmd.router.flags import ENV_PREFIX, ROLES, build_parser
from vllm_llmd.router.scoring import ScoringConfig
from vllm_llmd.router.slo import SLO, SLOConfig, parse_model_slo, parse_objective


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
    redis_timeout_s: float = 1.0
    no_ingest: bool = False
    prefill_allowlist: str | None = None
    # ---- what clients are trusted with (see router/client_body.py) ----
    trust_client_kv_transfer_params: bool = False
    trust_request_chat_template: bool = False
    # ---- blocking work off the event loop (see router/off_loop.py) ----
    tokenize_workers: int = 4
    tokenize_timeout_s: float = 1.0
    index_timeout_s: float = 0.5
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
    if args.tokenize_workers < 1:
        parser.error(f"--tokenize-workers must be >= 1, got {args.tokenize_workers}")
    for flag in ("tokenize_timeout_s", "index_timeout_s", "redis_timeout_s"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
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
