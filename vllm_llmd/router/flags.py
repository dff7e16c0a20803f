"""The router's command line: every flag, its default and its help (the reference in
docs/configuration.md is generated from it). `config.parse_config` turns the flags, and their
`VLLM_LLMD_ROUTER_*` environment variables, into a `RouterConfig`."""

from __future__ import annotations

import argparse

ENV_PREFIX = "VLLM_LLMD_ROUTER_"
ROLES = ("both", "prefill", "decode")


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
    add(
        "--trust-client-kv-transfer-params",
        action="store_true",
        help="forward the kv_transfer_params of client requests (only behind a trusted "
        "upstream that sets them, e.g. llm-d's EPP and sidecar); by default they are removed: "
        "they tell a pod which host to pull KV from into the shared prefix cache",
    )
    add(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a request's own chat_template (also in chat_template_kwargs) and render "
        "it to tokenize; by default such requests are refused with 400, as vLLM does",
    )
    add(
        "--tokenize-workers",
        type=int,
        default=4,
        help="threads that tokenize requests (and render chat templates) off the event loop",
    )
    add(
        "--tokenize-timeout-s",
        type=float,
        default=1.0,
        help="a request whose tokenization takes longer is routed by load alone",
    )
    add(
        "--index-timeout-s",
        type=float,
        default=0.5,
        help="a request whose index or shared-tier lookup (Redis) takes longer, or fails, is "
        "routed by load alone",
    )
    add("--redis-url", default=None, help="share the block index through Redis (redis://...)")
    add(
        "--redis-timeout-s",
        type=float,
        default=1.0,
        help="with --redis-url: seconds to connect to Redis and for one Redis call; past it the "
        "call fails (requests are then routed by load alone, events wait in their pod's queue)",
    )
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
