"""deploy/k8s/overlays/gateway (the router as the Gateway's endpoint picker), checked as
tests/test_deploy.py checks the other kustomizations: rendered here, Kubernetes objects against
the `kubernetes` client's OpenAPI models, the inference extension's objects against its CRD
schemas (vendored in deploy/k8s/gateway-api-inference-extension/), and the references between
them. The HTTPRoute (Gateway API) is checked for its references only: no schema is vendored."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from test_deploy import K8S, _model_for, _pod_containers, render, validate_model

from vllm_llmd.router.config_parse import parse_config

OVERLAY = K8S / "overlays/gateway"
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


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(OVERLAY)


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
    # the pool's pods: the decode pods, on their vLLM port
    decode = _one(rendered, "Deployment", "llmd-decode")
    assert pool["spec"]["selector"]["matchLabels"].items() <= (
        decode["spec"]["template"]["metadata"]["labels"].items()
    )
    (vllm,) = [c for c in _pod_containers(decode) if c["name"] == "vllm"]
    assert pool["spec"]["targetPorts"][0]["number"] in {p["containerPort"] for p in vllm["ports"]}
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
