"""`kv_transfer_params`: what a prefill instance returns and its decode instance receives.

The client (or router) sends the prefill instance `{"do_remote_decode": true}`; the prefill
instance answers with `RemotePrefillParams.to_dict()`; the router passes that dict unchanged to
the decode instance, whose connector reads it back with `from_dict`. Keys follow vLLM's
NixlConnector where the meaning is the same, so routers built for Nixl need no change; ours
carry an `llmd_` prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Any

import msgspec

from vllm_llmd.transfer.messages import PROTOCOL_VERSION, KVLayoutFingerprint

# The key that marks params as ours (a Nixl dict lacks it).
TRANSFER_ID_KEY = "llmd_transfer_id"


def prompt_digest(token_ids: list[int]) -> str:
    """Digest of a prompt's token ids: a decode instance loads KV only for the same prompt."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:32]


class ParamsError(ValueError):
    """kv_transfer_params that claim to be ours but are malformed."""


@dataclass(frozen=True)
class RemotePrefillParams:
    """Where and how a decode instance pulls a finished prefill's KV blocks."""

    engine_id: str
    request_id: str
    host: str
    # side-channel port of each tensor-parallel rank of the prefill instance
    ports: tuple[int, ...]
    # prefill-side block ids holding the prompt, in order (the last one may be partial)
    block_ids: tuple[int, ...]
    num_tokens: int
    # unguessable: only who got the prefill's answer can read or release these blocks
    transfer_id: str
    fingerprint: KVLayoutFingerprint
    prompt_digest: str
    protocol: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_request_id": self.request_id,
            "remote_host": self.host,
            "remote_port": self.ports[0],
            "remote_block_ids": list(self.block_ids),
            "remote_num_tokens": self.num_tokens,
            "tp_size": len(self.ports),
            "llmd_ports": list(self.ports),
            TRANSFER_ID_KEY: self.transfer_id,
            "llmd_fingerprint": msgspec.to_builtins(self.fingerprint),
            "llmd_prompt_digest": self.prompt_digest,
            "llmd_protocol": self.protocol,
        }

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> RemotePrefillParams:
        """Parse params made by `to_dict`; ParamsError names the key that is wrong."""
        try:
            fingerprint = msgspec.convert(params["llmd_fingerprint"], KVLayoutFingerprint)
            parsed = cls(
                engine_id=str(params["remote_engine_id"]),
                request_id=str(params["remote_request_id"]),
                host=str(params["remote_host"]),
                ports=tuple(int(p) for p in params["llmd_ports"]),
                block_ids=tuple(int(b) for b in params["remote_block_ids"]),
                num_tokens=int(params["remote_num_tokens"]),
                transfer_id=str(params[TRANSFER_ID_KEY]),
                fingerprint=fingerprint,
                prompt_digest=str(params["llmd_prompt_digest"]),
                protocol=int(params["llmd_protocol"]),
            )
        except KeyError as exc:
            raise ParamsError(f"kv_transfer_params lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError, msgspec.ValidationError) as exc:
            raise ParamsError(f"malformed kv_transfer_params: {exc}") from None
        if not parsed.ports or not parsed.block_ids or parsed.num_tokens <= 0:
            raise ParamsError("kv_transfer_params has no ports, blocks or tokens")
        return parsed


def is_llmd_remote_prefill(params: dict[str, Any] | None) -> bool:
    """True for params our prefill instance returned that still ask for a remote load."""
    return bool(params) and bool(params.get("do_remote_prefill")) and TRANSFER_ID_KEY in params


def wants_remote_decode(params: dict[str, Any] | None) -> bool:
    """True for a request the client sends to a prefill instance for a later remote decode."""
    return bool(params) and bool(params.get("do_remote_decode"))
