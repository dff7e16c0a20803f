"""The prefill target a gateway names in a request's headers (llm-d's): its prefiller headers
(`x-prefiller-host-port`, `x-prefiller-url`), or with --pull-from-holders its KV-source header,
which names a pod of any role holding the prompt's KV. Each is taken only for one of the
router's own pods of a fitting role or an allowlisted host (--prefill-allowlist), else 403.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from vllm_llmd.router.errors import error
from vllm_llmd.router.pod_spec import Role
from vllm_llmd.router.pod_state import PodState
from vllm_llmd.router.routing import PREFILL_ROLES

# llm-d's header naming a pod that holds the prompt's KV (HOST:PORT): --pull-from-holders
KV_SOURCE_HEADER = "x-kv-cache-source-host-port"


def prefill_target(
    headers: Mapping[str, str],
    pods: Mapping[str, PodState],
    pull_from_holders: bool,
    allowlist: str | None,
) -> str | None:
    """The pod URL the headers name to prefill the prompt (or pull its KV from), if allowed;
    None: they name none. `pods`: the router's, by URL; `allowlist`: comma-separated
    HOST:PORTs also allowed."""
    roles: tuple[Role, ...] = PREFILL_ROLES
    host_port = headers.get("x-prefiller-host-port")
    url = f"http://{host_port.strip()}" if host_port else headers.get("x-prefiller-url")
    source = headers.get(KV_SOURCE_HEADER)
    if not url and source and pull_from_holders:
        url, roles = f"http://{source.strip()}", ("prefill", "both")
    if not url:
        return None
    url = url.strip().rstrip("/")
    allowed = {pid for pid, pod in pods.items() if pod.spec.role in roles}
    allowed |= {
        f"http://{target.strip()}" for target in (allowlist or "").split(",") if target.strip()
    }
    if url not in allowed:
        raise error(web.HTTPForbidden, f"prefill target {url} is not in this router's allowlist")
    return url
