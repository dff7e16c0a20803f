"""What is wrong with the router's parsed flags, said in one line naming the flag.

`config_parse.config_from_args` turns the first problem into a usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping
from typing import Any

from vllm_llmd.events.curve import CurveClientKeys, CurveKeyError
from vllm_llmd.events.transport import TRANSPORTS
from vllm_llmd.router.chat_template import load_chat_template
from vllm_llmd.router.pod_spec import check_k8s_port
from vllm_llmd.router.scoring import PolicyName

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCESS_LOG_MODES = ("all", "requests", "off")
# the flags (dests) that only mean something with --k8s-label-selector
K8S_DISCOVERY_FLAGS = (
    "k8s_namespace",
    "k8s_port",
    "k8s_role_label",
    "k8s_kubeconfig",
    "k8s_api_url",
)
_AT_LEAST_ONE = ("tokenize_workers", "health_timeouts_to_evict", "replicate_per_minute")
_AT_LEAST_ZERO = ("replicate_hot_prefixes", "epp_fallbacks", "prefill_pace_tokens")
_POSITIVE = (
    "tokenize_timeout_s",
    "index_timeout_s",
    "redis_timeout_s",
    "shared_tier_ttl_s",
    "health_timeout_s",
)


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def args_error(args: argparse.Namespace, defaults: Mapping[str, Any]) -> str | None:
    """The first problem of the parsed flags (`defaults`: each flag's default), or None."""
    policies = [name.value for name in PolicyName]
    if args.policy not in policies:
        close = difflib.get_close_matches(args.policy, policies, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"--policy {args.policy!r} is not one of {', '.join(policies)}{hint}"
    if not args.pod and not args.k8s_label_selector:
        return (
            "give at least one --pod (or VLLM_LLMD_ROUTER_POD), or discover pods with "
            "--k8s-label-selector"
        )
    if (k8s_error := _k8s_error(args, defaults)) is not None:
        return k8s_error
    if args.no_ingest and not args.redis_url:
        return "--no-ingest needs --redis-url: another replica fills the shared index"
    for dest, allowed in (
        ("kv_events_transport", TRANSPORTS),
        ("access_log", ACCESS_LOG_MODES),
    ):
        if getattr(args, dest) not in allowed:
            return (
                f"{_option(dest)} must be one of {', '.join(allowed)}, got {getattr(args, dest)!r}"
            )
    if (curve_error := _curve_error(args)) is not None:
        return curve_error
    if args.log_level.upper() not in LOG_LEVELS:
        return f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}"
    for dest in _AT_LEAST_ONE:
        if getattr(args, dest) < 1:
            return f"{_option(dest)} must be >= 1, got {getattr(args, dest)}"
    for dest in _POSITIVE:
        if getattr(args, dest) <= 0:
            return f"{_option(dest)} must be > 0, got {getattr(args, dest)}"
    for dest in _AT_LEAST_ZERO:
        if getattr(args, dest) < 0:
            return f"{_option(dest)} must be >= 0 (0: off), got {getattr(args, dest)}"
    if args.replicate_hot_prefixes and not args.tokenizer:
        return "--replicate-hot-prefixes needs --tokenizer (a prefix is known by its tokens)"
    return _chat_template_error(args)


def _curve_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the --kv-events-curve-* flags, or None."""
    key, pod_key = args.kv_events_curve_key, args.kv_events_curve_pod_key
    if key is None and pod_key is None:
        return None
    if key is None or pod_key is None:
        return "--kv-events-curve-key and --kv-events-curve-pod-key go together"
    if args.kv_events_transport != "zmq":
        return (
            "--kv-events-curve-key needs --kv-events-transport zmq (the zmtp client speaks "
            "ZMTP's NULL security only)"
        )
    try:
        CurveClientKeys.load(key, pod_key)
    except CurveKeyError as exc:
        return f"--kv-events-curve-key/--kv-events-curve-pod-key: {exc}"
    return None


def _chat_template_error(args: argparse.Namespace) -> str | None:
    if args.chat_template is None:
        return None
    if not args.tokenizer:
        return "--chat-template needs --tokenizer (the router renders templates to tokenize)"
    try:
        load_chat_template(args.chat_template)
    except ValueError as exc:
        return f"--chat-template {exc}"
    return None


def _k8s_error(args: argparse.Namespace, defaults: Mapping[str, Any]) -> str | None:
    """What is wrong with the --k8s-* flags, or None."""
    if args.k8s_label_selector is None:
        given = [
            _option(dest) for dest in K8S_DISCOVERY_FLAGS if getattr(args, dest) != defaults[dest]
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
