"""`kv_transfer_params`: what a prefill instance returns and its decode instance receives.

The client (or router) sends the prefill instance `{"do_remote_decode": true}`; the prefill
instance answers with `RemotePrefillParams.to_dict()`; the router passes that dict unchanged to
the decode instance, whose connector reads it back with `from_dict`. Keys follow vLLM's
NixlConnector where the meaning is the same, so routers built for Nixl need no change; ours
carry an `llmd_` prefix.

These params reach the decode instance from its API clients, so nothing in them is trusted:
`from_dict` checks every field's type and range (a field that is wrong is named in the error)
and the scheduler half checks them against the request and this instance before any
connection is made. Anything wrong means "recompute", never an exception in the engine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from array import array
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.transfer.messages import PROTOCOL_VERSION

# The key that marks params as ours (a Nixl dict lacks it).
TRANSFER_ID_KEY = "llmd_transfer_id"

# Bounds of what a well-formed answer of our prefill can hold; anything past them is refused
# before it is looked at further (a client can send these params to any decode instance).
MAX_TP_SIZE = 256
MAX_BLOCKS = 1 << 20
MAX_TOKENS = 1 << 31
_Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
_BlockId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# secrets.token_urlsafe(24) makes 32 characters; accept any URL-safe id of sane length
_TransferId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
_Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
# RFC 1123 host name (IP literals are checked with ipaddress instead)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$", re.ASCII)


def prompt_digest(token_ids: list[int]) -> str:
    """Digest of a prompt's token ids: a decode instance loads KV only for the same prompt."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:32]


class ParamsError(ValueError):
    """kv_transfer_params that claim to be ours but are malformed."""


class _ParamsWire(msgspec.Struct, frozen=True):
    """The keys `from_dict` reads, typed and bounded (other keys are ignored)."""

    remote_engine_id: _Name
    remote_request_id: _Name
    remote_host: str
    llmd_ports: Annotated[list[_Port], msgspec.Meta(min_length=1, max_length=MAX_TP_SIZE)]
    remote_block_ids: Annotated[list[_BlockId], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS)]
    remote_num_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]
    llmd_transfer_id: _TransferId
    llmd_fingerprint: KVLayoutFingerprint
    llmd_prompt_digest: _Digest
    llmd_protocol: Annotated[int, msgspec.Meta(ge=1)]


def is_host_name(text: str) -> bool:
    """True for an RFC 1123 host name (letters, digits, hyphens, dot-separated labels)."""
    return _HOST_NAME.match(text) is not None


def check_host(host: str) -> str:
    """host if it is an IP address or an RFC 1123 host name; ParamsError otherwise."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not is_host_name(host):
        raise ParamsError(f"kv_transfer_params['remote_host'] {host[:64]!r} is not a host name")
    return host.lower()


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
    def from_dict(cls, params: Any) -> RemotePrefillParams:
        """Parse params made by `to_dict`; ParamsError names the key that is wrong."""
        if not isinstance(params, dict):
            raise ParamsError(f"kv_transfer_params must be an object, got {type(params).__name__}")
        try:
            wire = msgspec.convert(params, _ParamsWire)
        except msgspec.ValidationError as exc:
            raise ParamsError(f"malformed kv_transfer_params: {exc}") from None
        except (RecursionError, TypeError, ValueError) as exc:
            raise ParamsError(f"malformed kv_transfer_params: {type(exc).__name__}") from None
        fingerprint = wire.llmd_fingerprint
        if fingerprint.block_size <= 0:
            raise ParamsError("kv_transfer_params['llmd_fingerprint'] has no block size")
        num_blocks = math.ceil(wire.remote_num_tokens / fingerprint.block_size)
        if len(wire.remote_block_ids) != num_blocks:
            raise ParamsError(
                f"kv_transfer_params has {len(wire.remote_block_ids)} remote_block_ids for "
                f"{wire.remote_num_tokens} tokens ({num_blocks} blocks expected)"
            )
        if len(set(wire.remote_block_ids)) != num_blocks:
            raise ParamsError("kv_transfer_params['remote_block_ids'] repeats a block id")
        return cls(
            engine_id=wire.remote_engine_id,
            request_id=wire.remote_request_id,
            host=check_host(wire.remote_host),
            ports=tuple(wire.llmd_ports),
            block_ids=tuple(wire.remote_block_ids),
            num_tokens=wire.remote_num_tokens,
            transfer_id=wire.llmd_transfer_id,
            fingerprint=fingerprint,
            prompt_digest=wire.llmd_prompt_digest,
            protocol=wire.llmd_protocol,
        )


def is_llmd_remote_prefill(params: Any) -> bool:
    """True for params our prefill instance returned that still ask for a remote load."""
    return (
        isinstance(params, dict)
        and bool(params.get("do_remote_prefill"))
        and (TRANSFER_ID_KEY in params)
    )


def wants_remote_decode(params: Any) -> bool:
    """True for a request the client sends to a prefill instance for a later remote decode."""
    return isinstance(params, dict) and params.get("do_remote_decode") is True
