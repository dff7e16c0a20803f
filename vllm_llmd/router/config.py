"""The router's configuration: one dataclass, built from the command line or the environment.

Every flag `--some-flag` can also be set as `VLLM_LLMD_ROUTER_SOME_FLAG` (the flag wins).
`--pod` is repeatable; in the environment, separate pods with whitespace. `--help` lists the
flags in the groups of `GROUPS`, each with its default and its variable.

A pod is `URL[,role=both|prefill|decode][,events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]`
(`router/pod_spec.py`). Without `events`, the router asks the pod's `GET /kv_event_sources`
(vLLM's own discovery). Pods can also be discovered in Kubernetes, by label selector
(`--k8s-*`, see `router/k8s.py`). The values' checks are in `router/config_checks.py`; the
parser, and parsing into a `RouterConfig`, in `router/config_parse.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.router.config_checks import LOG_LEVELS
from vllm_llmd.router.config_k8s import PODS, KubernetesDiscoveryFlags
from vllm_llmd.router.flags import (
    ENV_PREFIX,
    flag,
)
from vllm_llmd.router.pod_spec import ROLES, PodSpec, Role, check_k8s_port, is_role
from vllm_llmd.router.scoring import ScoringConfig
from vllm_llmd.router.slo import SLO, SLOConfig, parse_model_slo, parse_objective

__all__ = [
    "ENV_PREFIX",
    "GROUPS",
    "ROLES",
    "PodSpec",
    "Role",
    "RouterConfig",
    "check_k8s_port",
    "is_role",
]

PROG = "vllm-llmd-router"
# the sections of --help and of docs/configuration.md, in this order (each field names one)
SERVING, TOKENS, ROUTING = "serving", "tokenizer", "routing policy"
SLOS, INDEX, PD, HEALTH, LOGGING = "SLO", "index and events", "P/D", "health", "logging"
GROUPS = (SERVING, PODS, TOKENS, ROUTING, SLOS, INDEX, PD, HEALTH, LOGGING)


@dataclass(frozen=True)
class RouterConfig(KubernetesDiscoveryFlags):
    """Everything the router needs. Each field is a flag, declared once here (the Kubernetes
    discovery ones in `config_k8s`): its default, type and help (`flags.flag`); `build_parser`
    and docs/configuration.md come from them."""

    pods: tuple[PodSpec, ...] = flag(
        (),
        "a vLLM pod (repeatable); role both|prefill|decode",
        metavar="URL[,role=R][,events=E][,replay=P]",
        name="pod",
        group=PODS,
    )
    host: str = flag("127.0.0.1", "address to listen on", group=SERVING)
    port: int = flag(8000, "port to listen on", group=SERVING)
    epp_port: int | None = flag(
        None,
        "also serve the Gateway API Inference Extension endpoint picker on this port (Envoy "
        "ext_proc gRPC, on --host): the gateway asks it which pod serves each request and "
        "forwards the request itself; the OpenAI proxy, /health and /metrics stay on --port "
        "(needs the [epp] extra)",
        metavar="PORT",
        group=SERVING,
    )
    epp_fallbacks: int = flag(
        2,
        "the endpoint picker also names up to this many fallback pods after the picked one "
        "(the next best healthy decode pods by the policy's scores, in order, in "
        "x-gateway-destination-endpoint): a gateway with retries tries them when the first "
        "fails; 0: the picked pod alone",
        metavar="N",
        group=SERVING,
    )
    epp_target_port: int | None = flag(
        None,
        "the InferencePool's targetPort when it is not the port the router polls the decode "
        "pods on (a routing sidecar's: overlays/gateway-pd): the endpoint picker names a "
        "decode pod as its IP and this port, and reads the gateway's endpoints so",
        metavar="PORT",
        group=SERVING,
    )
    policy: str = flag(
        "slo",
        "routing policy: round_robin, load, prefix, kv_aware (prefix hit and load), "
        "slo (kv_aware, and for requests that name an SLO, objective or fairness id: "
        "predicted latency against their SLOs, with priority and fair queueing)",
        group=ROUTING,
    )
    tokenizer: str | None = flag(
        None,
        "local path of the model's tokenizer (needed by prefix-aware policies)",
        group=TOKENS,
    )
    block_size: int | None = flag(
        None,
        "the pods' KV block size in tokens; default: the first pod's (its "
        "vllm:cache_config_info), and a pod that differs is routed by load alone",
        group=TOKENS,
    )
    hash_algorithm: str | None = flag(
        None,
        "the pods' --prefix-caching-hash-algo; default: the first pod's (as --block-size), "
        "else sha256",
        group=TOKENS,
    )
    hash_seed: str | None = flag(None, "the pods' PYTHONHASHSEED, if they set one", group=TOKENS)
    chat_template: str | None = flag(
        None,
        "render chat requests with this Jinja template instead of the tokenizer's, as the pods "
        "do when they run `vllm serve --chat-template` (a file, or the template itself)",
        group=TOKENS,
        metavar="PATH",
    )
    events_topic: str = flag("kv", "topic of the pods' KV events", group=INDEX)
    kv_events_transport: str = flag(
        "zmtp",
        "how the router speaks to the pods' KV-event sockets: zmtp (our own ZMTP client: every "
        "frame and whole message bounded before it is buffered, a peer that breaks a bound cut "
        "and reconnected with backoff) or zmq (pyzmq; libzmq buffers a multipart message that "
        "never ends without limit: for publishers you trust)",
        metavar="{zmtp,zmq}",
        group=INDEX,
    )
    kv_events_curve_key: str | None = flag(
        None,
        "read the pods' KV events encrypted with CURVE: the router's certificate "
        "(NAME.key_secret, from zmq.auth.create_certificates); needs --kv-events-curve-pod-key "
        "and --kv-events-transport zmq; the pods set VLLM_LLMD_KV_EVENTS_CURVE_SECRET_KEY",
        metavar="FILE",
        group=INDEX,
    )
    kv_events_curve_pod_key: str | None = flag(
        None,
        "the pods' CURVE public certificate (NAME.key): only a publisher holding its secret "
        "key is heard",
        metavar="FILE",
        group=INDEX,
    )
    pd_threshold_tokens: int = flag(
        256,
        "prompts with more uncached tokens go prefill -> decode when both roles exist, while "
        "the latency models are cold; once warm, P/D is chosen when predicted faster than "
        "the decode pod computing alone",
        group=PD,
    )
    api_key: str | None = flag(
        None, "require 'Authorization: Bearer KEY' from clients", group=SERVING, secret=True
    )
    max_body_bytes: int = flag(8 << 20, "largest request body accepted", group=SERVING)
    request_timeout_s: float = flag(600.0, "timeout of one upstream request", group=SERVING)
    poll_interval_s: float = flag(1.0, "pod health and load poll interval", group=HEALTH)
    health_timeout_s: float = flag(
        5.0,
        "seconds a pod's /health may take before the check counts as timed out",
        group=HEALTH,
    )
    health_timeouts_to_evict: int = flag(
        3,
        "timed-out /health checks in a row that take a pod out of rotation (a busy pod on a "
        "loaded host answers late yet serves; a refused or failed check evicts at once)",
        group=HEALTH,
    )
    audit_log: str | None = flag(
        None, "append one JSON line per routing decision here", group=LOGGING
    )
    audit_prompts: bool = flag(False, "include prompt text in the audit log", group=LOGGING)
    log_level: str = flag(
        "INFO", "the router's log level", group=LOGGING, metavar="{" + ",".join(LOG_LEVELS) + "}"
    )
    access_log: str = flag(
        "requests",
        "access log lines (logger aiohttp.access): all, requests (all but the GET /health and "
        "GET /metrics of probes and scrapers), off",
        group=LOGGING,
        metavar="{all,requests,off}",
    )
    index_max_entries: int = flag(1_000_000, "in-memory index bound (blocks)", group=INDEX)
    recent_route_ttl_s: float = flag(
        5.0,
        "for this long after routing a prompt to a pod, count its prefix as that pod's "
        "until the pod's KV events say so (a second request on the prefix follows the first); "
        "0 turns it off",
        group=ROUTING,
    )
    kv_room: bool = flag(
        True,
        "a pod whose KV cache (its num_gpu_blocks) cannot hold a request beside the router's "
        "requests in flight there is saturated for that request, whatever its KV-usage gauge "
        "reads (README: KV room)",
        group=ROUTING,
    )
    prefill_pace_tokens: int = flag(
        2048,
        "a long prompt (over half this many uncached tokens) whose uncached tokens, with the "
        "uncached prompt tokens already ahead of it at the pod that would compute them, exceed "
        "this goes to a pod where they do not, or waits in the router until one has room: "
        "long prompts reach a pod one after another, not sharing its steps (README: prefill "
        "pacing; set it near the pods' --max-num-batched-tokens). Every policy but "
        "round_robin; 0 turns it off",
        group=ROUTING,
    )
    shared_tier_ttl_s: float = flag(
        300.0,
        "how long a block announced in the shared KV tier (medium SHARED) counts as there "
        "without being announced again (the tier evicts silently)",
        group=INDEX,
    )
    pull_from_holders: bool = flag(
        False,
        "a pod (role both, LLMDConnector as kv_both) that holds --pd-threshold-tokens more of "
        "a prompt than the chosen pod becomes its KV source: it runs the prompt's prefill, "
        "computing only what it lacks, and the chosen pod pulls the KV from it instead of "
        "computing it; also honours llm-d's x-kv-cache-source-host-port header",
        group=PD,
    )
    replicate_hot_prefixes: int = flag(
        0,
        "copy a prefix to the least-loaded pod lacking it once this many requests within 2 s "
        "were routed past its holder or queued behind others there: the pod pulls it from the "
        "holder (as --pull-from-holders does) off the request path; 0 turns it off",
        group=PD,
    )
    replicate_per_minute: int = flag(
        60, "at most this many hot-prefix copies a minute (--replicate-hot-prefixes)", group=PD
    )
    prefill_allowlist: str | None = flag(
        None,
        "sidecar mode: prefill targets an upstream gateway may name in the "
        "x-prefiller-host-port / x-prefiller-url headers (besides the --pod prefill pods); "
        "a header naming any other target is refused with 403",
        metavar="HOST:PORT[,HOST:PORT...]",
        group=PD,
    )
    # ---- what clients are trusted with (see router/client_body.py) ----
    trust_client_kv_transfer_params: bool = flag(
        False,
        "forward the kv_transfer_params of client requests (only behind a trusted "
        "upstream that sets them, e.g. llm-d's EPP and sidecar); by default they are removed: "
        "they tell a pod which host to pull KV from into the shared prefix cache",
        group=SERVING,
    )
    trust_request_chat_template: bool = flag(
        False,
        "accept a request's own chat_template (also in chat_template_kwargs) and render "
        "it to tokenize; by default such requests are refused with 400, as vLLM does",
        group=SERVING,
    )
    # ---- blocking work off the event loop (see router/off_loop.py) ----
    tokenize_workers: int = flag(
        4,
        "threads that tokenize requests (and render chat templates) off the event loop",
        group=TOKENS,
    )
    tokenize_timeout_s: float = flag(
        1.0,
        "a request whose tokenization takes longer is routed by load alone",
        group=TOKENS,
    )
    index_timeout_s: float = flag(
        0.5,
        "a request whose index or shared-tier lookup (Redis) takes longer, or fails, is "
        "routed by load alone",
        group=INDEX,
    )
    redis_url: str | None = flag(
        None, "share the block index through Redis (redis://...)", group=INDEX
    )
    redis_timeout_s: float = flag(
        1.0,
        "with --redis-url: seconds to connect to Redis and for one Redis call; past it the "
        "call fails (requests are then routed by load alone, events wait in their pod's queue)",
        group=INDEX,
    )
    no_ingest: bool = flag(
        False,
        "with --redis-url: read the shared index but follow no pod's KV events (another "
        "replica does; each pod must have exactly one ingesting replica)",
        group=INDEX,
    )
    # ---- load thresholds and SLO-aware routing (see slo_config / scoring_config) ----
    max_waiting: int = flag(
        8,
        "a pod with this many queued requests (its gauge, or the router's in-flight "
        "requests beyond its running batch) is saturated",
        group=ROUTING,
    )
    max_kv_usage: float = flag(0.95, "a pod this full (0..1) is saturated", group=ROUTING)
    w_prefix: float = flag(
        1.0,
        "kv_aware: weight of the cached-prefix score (0..1, tier-weighted share of the "
        "prompt's blocks a pod holds)",
        group=ROUTING,
    )
    w_load: float = flag(
        0.5,
        "kv_aware: weight of the load score (0..1, a pod's requests against the busiest "
        "candidate's, or its KV usage); higher spreads conversations more, lower keeps them "
        "on the pod that holds their prefix",
        group=ROUTING,
    )
    slo_ttft_ms: float | None = flag(
        None,
        "default time-to-first-token SLO (a request's x-llm-d-slo-ttft-ms header wins)",
        group=SLOS,
    )
    slo_tpot_ms: float | None = flag(
        None,
        "default time-per-output-token SLO (a request's x-llm-d-slo-tpot-ms header wins)",
        group=SLOS,
    )
    model_slo: tuple[str, ...] = flag(
        (),
        "SLO defaults of one model (repeatable)",
        metavar="MODEL:ttft=MS,tpot=MS",
        group=SLOS,
    )
    objective: tuple[str, ...] = flag(
        (),
        "priority of requests naming this x-llm-d-inference-objective (repeatable); "
        "negative priorities are sheddable: refused with 429 when no pod meets their SLO",
        metavar="NAME=PRIORITY",
        group=SLOS,
    )
    slo_headroom: float = flag(
        0.1,
        "policy slo: a pod meets an SLO when predicted <= (1 - headroom) * SLO",
        group=SLOS,
    )
    max_queue: int = flag(
        1024,
        "policy slo: requests the router may hold while the pool is saturated",
        group=SLOS,
    )
    queue_timeout_s: float = flag(
        30.0,
        "policy slo: longest wait in the router's queue for a request without a TTFT SLO",
        group=SLOS,
    )
    latency_min_samples: int = flag(
        8,
        "observations a pod's latency model needs before its predictions are used",
        group=SLOS,
    )

    def kv_events_curve(self) -> CurveClientKeys | None:
        """The CURVE keys of the KV-event streams; None: in clear. CurveKeyError names a bad
        file (the flags were checked when parsed)."""
        if self.kv_events_curve_key is None or self.kv_events_curve_pod_key is None:
            return None
        return CurveClientKeys.load(self.kv_events_curve_key, self.kv_events_curve_pod_key)

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
