"""deploy/k8s/overlays/gateway (the router as the Gateway's endpoint picker) and
overlays/gateway-pd (the same, with the router as a routing sidecar in each decode pod for
P/D), checked as tests/test_deploy.py checks the other kustomizations: rendered here,
Kubernetes objects against the `kubernetes` client's OpenAPI models, the inference extension's
objects against its CRD schemas (vendored in deploy/k8s/gateway-api-inference-extension/), and
the references between them: the pool, the picker and the route; the picker's gRPC health
probes; and in gateway-pd the sidecar (its port the pool's target, its vLLM the one the picker
polls, the prefill pods it discovers the ones the picker names in x-prefiller-host-port, and
that it honours that header), and the NetworkPolicies that let the gateway and the sidecar
through. The HTTPRoute (Gateway API) is checked for its references only: no schema is
vendored."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from aiohttp import web
from fake_kube_api import selector_matches
from kubernetes import client
from test_deploy import (
    K8S,
    _allowed,
    _labels_match,
    _model_for,
    _pod_containers,
    render,
    validate_model,
)

from vllm_llmd.router.cli import build_router
from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.epp_health import LIVENESS, READINESS
from vllm_llmd.router.epp_wire import PREFILLER_HEADER, endpoint_of
from vllm_llmd.router.k8s import pod_spec
from vllm_llmd.router.pod_spec import PodSpec

OVERLAYS = ("overlays/gateway", "overlays/gateway-pd")
CRDS = K8S / "gateway-api-inference-extension"
CRD_KINDS = {"InferencePool", "InferenceObjective"}


def _closed(schema: Any) -> Any:
    """The schema with unknown fields refused (the API server would prune them silently)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


def _crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schema = version["schema"]["openAPIV3Schema"]
                schemas[api_version, crd["spec"]["names"]["kind"]] = _closed(schema)
    return schemas


def _without_nulls(value: Any) -> Any:
    """What kustomize makes of a strategic-merge patch's nulls: the keys are removed (the
    renderer of tests/test_deploy.py keeps them)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict]:
    return [_without_nulls(obj) for obj in render(K8S / request.param)]


@pytest.fixture(scope="module")
def pd() -> list[dict]:
    return [_without_nulls(obj) for obj in render(K8S / "overlays/gateway-pd")]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def test_objects_match_their_schemas(rendered):
    schemas = _crd_schemas()
    kinds = {o["kind"] for o in rendered}
    assert CRD_KINDS | {"HTTPRoute", "Deployment", "Service"} <= kinds
    for obj in rendered:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_KINDS:
            schema = schemas[obj["apiVersion"], obj["kind"]]
            meta = {k: v for k, v in obj.items() if k != "metadata"}  # metadata: the server's
            jsonschema.validate(
                meta,
                {
                    **schema,
                    "properties": {
                        k: v for k, v in schema["properties"].items() if k != "metadata"
                    },
                },
            )
        elif obj["kind"] != "HTTPRoute":
            validate_model(obj, _model_for(obj), where)


def _container(objects: list[dict], deployment: str, name: str) -> dict:
    (container,) = [
        c for c in _pod_containers(_one(objects, "Deployment", deployment)) if c["name"] == name
    ]
    return container


def _config(container: dict) -> RouterConfig:
    return parse_config(container["args"], environ={})


def test_the_pool_the_picker_and_the_route_point_at_each_other(rendered):
    pool = _one(rendered, "InferencePool")
    service = _one(rendered, "Service", pool["spec"]["endpointPickerRef"]["name"])
    (port,) = [
        p
        for p in service["spec"]["ports"]
        if p["port"] == pool["spec"]["endpointPickerRef"]["port"]["number"]
    ]
    router = _one(rendered, "Deployment", "llmd-router")
    (container,) = [c for c in _pod_containers(router) if c["name"] == "router"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == parse_config(container["args"], environ={}).epp_port
    labels = router["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # the pool's pods: the decode pods, on a port one of their containers serves
    decode = _one(rendered, "Deployment", "llmd-decode")
    assert pool["spec"]["selector"]["matchLabels"].items() <= (
        decode["spec"]["template"]["metadata"]["labels"].items()
    )
    (target,) = [p["number"] for p in pool["spec"]["targetPorts"]]
    served = {p["containerPort"] for c in _pod_containers(decode) for p in c.get("ports", [])}
    assert target in served
    # ... the port the picker names them on: the one it polls (their vLLM's), or its
    # --epp-target-port
    config = _config(container)
    assert config.k8s_label_selector is not None and config.k8s_port.isdigit()
    assert (config.epp_target_port or int(config.k8s_port)) == target
    (vllm,) = [c for c in _pod_containers(decode) if c["name"] == "vllm"]
    assert int(config.k8s_port) in {p["containerPort"] for p in vllm["ports"]}
    for objective in [o for o in rendered if o["kind"] == "InferenceObjective"]:
        assert objective["spec"]["poolRef"]["name"] == pool["metadata"]["name"]
    route = _one(rendered, "HTTPRoute")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [
        {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": pool["metadata"]["name"],
        }
    ]


def test_the_pickers_probes_ask_its_grpc_health_service(rendered):
    """Kubernetes `grpc:` probes (one handler each) on the picker's port, for the services
    router/epp_health.py serves: readiness (a healthy decode pod) and liveness."""
    router = _container(rendered, "llmd-router", "router")
    epp_port = _config(router).epp_port
    services = {}
    for probe in ("readinessProbe", "livenessProbe"):
        handlers = {"exec", "httpGet", "tcpSocket", "grpc"} & set(router[probe])
        assert handlers == {"grpc"}, (probe, router[probe])
        assert router[probe]["grpc"]["port"] == epp_port
        services[probe] = router[probe]["grpc"]["service"]
    assert services == {"readinessProbe": READINESS, "livenessProbe": LIVENESS}


def test_the_decode_pods_sidecar_is_the_pools_target(pd):
    pool = _one(pd, "InferencePool")
    (target,) = [p["number"] for p in pool["spec"]["targetPorts"]]
    sidecar = _container(pd, "llmd-decode", "router")
    config = _config(sidecar)
    named = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert config.port == target == named["router"]
    # its one decode pod is its own vLLM, over localhost, on the port the picker polls
    picker = _config(_container(pd, "llmd-router", "router"))
    (own,) = [spec for spec in config.pods if spec.role == "decode"]
    assert own.pod_id == f"http://127.0.0.1:{picker.k8s_port}"
    assert config.pods == (own,)
    vllm = _container(pd, "llmd-decode", "vllm")
    assert int(picker.k8s_port) in {p["containerPort"] for p in vllm["ports"]}
    # it never starts a P/D step itself: only the picker's header does (no tokenizer, no
    # prompt length to decide on)
    assert config.tokenizer is None
    # its readiness is its vLLM's (the router's /health), on its own port
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/health", "port": "router"}


def _discovered(objects: list[dict], deployment: str, config: RouterConfig, ip: str) -> str:
    """The pod id `config`'s Kubernetes discovery gives a pod of `deployment` at `ip`."""
    labels = _one(objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    selector = config.k8s_label_selector or ""
    assert selector_matches(selector, labels), f"{selector} does not select {deployment}"
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(labels=labels), status=client.V1PodStatus(pod_ip=ip)
    )
    return pod_spec(pod, config.k8s_port, config.k8s_role_label).pod_id


def test_the_sidecar_honours_the_prefill_pod_the_picker_names(pd):
    """The picker names a prefill pod as the IP:PORT of its own discovery; the sidecar
    discovers the same pods (its selector picks the prefill pods, and not the decode ones) and
    so runs the prefill step there; a pod it does not know is refused (403)."""
    picker = _config(_container(pd, "llmd-router", "router"))
    sidecar_config = _config(_container(pd, "llmd-decode", "router"))
    prefill_id = _discovered(pd, "llmd-prefill", picker, "10.1.2.3")
    header = endpoint_of(prefill_id)  # what the picker sends (prefill pods: their own port)
    assert _discovered(pd, "llmd-prefill", sidecar_config, "10.1.2.3") == prefill_id
    decode = _one(pd, "Deployment", "llmd-decode")["spec"]["template"]["metadata"]["labels"]
    assert not selector_matches(sidecar_config.k8s_label_selector or "", decode)
    sidecar = build_router(sidecar_config)
    try:
        sidecar.registry.add_pod(PodSpec(prefill_id, "prefill"))
        assert sidecar._prefill_from_headers({PREFILLER_HEADER: header}) == prefill_id
        with pytest.raises(web.HTTPForbidden):
            sidecar._prefill_from_headers({PREFILLER_HEADER: "10.6.6.6:8000"})
    finally:
        sidecar.close()
    # discovery reads pods through the Role bound to the decode pods' ServiceAccount
    account = _one(pd, "Deployment", "llmd-decode")["spec"]["template"]["spec"]
    binding = _one(pd, "RoleBinding")
    assert {"kind": "ServiceAccount", "name": account["serviceAccountName"]}.items() <= (
        binding["subjects"][0].items()
    )
    rules = _one(pd, "Role", binding["roleRef"]["name"])["rules"]
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in rules)


def _gateway_reaches(objects: list[dict], target: dict[str, str], port: str) -> bool:
    """Whether the gateway's pods (namespace gateway-system) may open `port` on a pod labelled
    `target` (test_deploy._allowed reads pod selectors only; these peers are namespaces)."""
    gateway = {"kubernetes.io/metadata.name": "gateway-system"}
    for policy in [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]:
        if not _labels_match(policy["podSelector"], target):
            continue
        for rule in policy.get("ingress", []):
            peers = [peer.get("namespaceSelector") for peer in rule.get("from", [])]
            ports = [p["port"] for p in rule.get("ports", [])]
            if port in ports and any(peer and _labels_match(peer, gateway) for peer in peers):
                return True
    return False


def test_the_network_policies_let_the_gateway_and_the_sidecar_through(pd):
    decode, prefill, router = (
        _one(pd, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        for name in ("llmd-decode", "llmd-prefill", "llmd-router")
    )
    assert _gateway_reaches(pd, decode, "router")  # the sidecar, the pool's target
    assert not _gateway_reaches(pd, decode, "http")  # not its vLLM
    # the sidecars call the prefill pods' API, and their vLLM pulls over the side channel
    for port in ("http", "kv-side"):
        assert _allowed(pd, decode, prefill, port)
    assert not _allowed(pd, {"app": "something-else"}, prefill, "http")
    # the picker still polls every vLLM pod and reads its KV events
    for pod in (decode, prefill):
        for port in ("http", "kv-events", "kv-replay"):
            assert _allowed(pd, router, pod, port)


def test_every_object_is_in_the_bases_namespace(rendered):
    namespaced = [o for o in rendered if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"llmd"}
