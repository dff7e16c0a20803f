"""A pod as the router is told of it: `URL[,role=...][,events=...][,replay=...]` (`--pod`), or
discovered in Kubernetes (`router/k8s.py`, whose `--k8s-port` is checked here too)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, TypeGuard, get_args

# what a pod does: prefill and decode, or one of the two (P/D)
Role = Literal["both", "prefill", "decode"]
ROLES: tuple[Role, ...] = get_args(Role)


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
