"""The router's Kubernetes pod-discovery flags (`--k8s-*`, on with `--k8s-label-selector`; see
`router/k8s.py`): a base of `config.RouterConfig`, declared as its other flags are."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_llmd.router.flags import flag

# the --help section of these flags and of `--pod` (config.GROUPS orders the sections)
PODS = "pods and discovery"


@dataclass(frozen=True)
class KubernetesDiscoveryFlags:
    """Discover the pods in Kubernetes, by label selector, instead of (or besides) `--pod`."""

    k8s_label_selector: str | None = flag(
        None,
        "discover pods in Kubernetes: the ready pods this label selector picks (e.g. "
        "'app=vllm'), watched as they come and go; with or without --pod",
        metavar="SELECTOR",
        group=PODS,
    )
    k8s_namespace: str | None = flag(
        None,
        "namespace of the discovered pods (default: the router's own, in a cluster)",
        group=PODS,
    )
    k8s_port: str = flag(
        "8000",
        "the pods' vLLM port: a number, or the name of a container port",
        metavar="PORT|NAME",
        group=PODS,
    )
    k8s_role_label: str = flag(
        "llm-d.ai/role",
        "pod label whose value (prefill, decode, both) is the pod's role; none: both",
        group=PODS,
    )
    k8s_kubeconfig: str | None = flag(
        None,
        "reach the cluster with this kubeconfig (default: the pod's service account)",
        metavar="FILE",
        group=PODS,
    )
    k8s_api_url: str | None = flag(
        None,
        "reach the Kubernetes API at this URL without credentials (tests, kubectl proxy)",
        metavar="URL",
        group=PODS,
    )
