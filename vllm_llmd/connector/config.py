"""LLMDConnector's settings: every key of `kv_connector_extra_config`, typed, with defaults.

An unknown key or a value of the wrong type is refused at start-up with a message naming it
(and the closest known key or value); a typo must not silently fall back to a default. The
plugin runs this check in vLLM's API-server process, before any model loads
(vllm_llmd/plugin.py), and the connector runs it again in each engine process.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import ssl
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, Literal, get_args

from vllm_llmd.transfer import tls
from vllm_llmd.transfer.params import is_host_name

# Eviction policies of the offload tiers: the names `vllm_llmd.offload.policy.make_policy`
# knows (tests/test_connector_config.py checks that the two lists agree).
OffloadPolicy = Literal["lru"]

# The side channel's TLS files: all three set (TLS on) or none.
_TLS_KEYS = ("side_channel_tls_cert", "side_channel_tls_key", "side_channel_tls_ca")

# Size units of byte-size keys, lower-cased: binary (1024^n) unless it ends in a plain "b"
# after a decimal prefix (KB/MB/GB/TB = 1000^n).
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1024**n for n, p in enumerate("kmgt", 1)},
    **{p + "ib": 1024**n for n, p in enumerate("kmgt", 1)},
    **{p + "b": 1000**n for n, p in enumerate("kmgt", 1)},
}
_SIZE = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
BYTE_SIZE_FORMS = (
    'an int, or a string with a unit such as "512MiB", "16GiB", "2GB", "1.5 GiB" '
    "(KiB/MiB/GiB/TiB and K/M/G/T = 1024^n bytes, KB/MB/GB/TB = 1000^n, case-insensitive)"
)


def parse_byte_size(value: object) -> int:
    """A byte count from an int, an integral float (16e9) or a string with an optional unit.

    "512MiB", "16 GiB", "1.5GiB", "16G" and "4096" are binary or plain; "2GB" is 2 * 1000^3.
    A unit's fractional result is rounded down to whole bytes; a plain number must be whole.
    ValueError (saying why and naming the accepted forms) for anything else, negatives included.
    """

    def refuse(why: str) -> ValueError:
        return ValueError(f"{why}; a byte size is {BYTE_SIZE_FORMS}; got {value!r}")

    scale = 1
    if isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float) and math.isfinite(value):
        number = Decimal(value)
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        unit = match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise refuse(f"unknown size unit {match.group(2)!r}")
        number, scale = Decimal(match.group(1)), _SIZE_UNITS[unit]
    elif isinstance(value, str) and value.strip().startswith("-"):
        raise refuse("must be >= 0")
    else:
        raise refuse("not a byte size")
    if number < 0:
        raise refuse("must be >= 0")
    size = number * scale
    if size >= 1 << 63:
        raise refuse("too large")
    if scale == 1 and size != size.to_integral_value():
        raise refuse("must be a whole number of bytes")
    return int(size)


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x' or 'y'?)' naming the choices closest to word, or ''."""
    scores = {c: difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio() for c in choices}
    best = max(scores.values(), default=0.0)
    if best < 0.6:
        return ""
    close = sorted((c for c in choices if scores[c] >= best - 0.05), key=lambda c: -scores[c])
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


def check_host(key: str, host: str) -> None:
    """ValueError naming key unless host is an IP address or an RFC 1123 host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not is_host_name(host):
            raise ValueError(
                f"LLMDConnector: kv_connector_extra_config[{key!r}] must be an IP address or a "
                f"host name, got {host!r}"
            ) from None


_TCP_URL = re.compile(r"tcp://(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d{1,5})")


def check_tcp_url(key: str, url: str) -> None:
    """ValueError naming key unless url is tcp://HOST:PORT (HOST: IP, [IPv6] or host name)."""
    match = _TCP_URL.fullmatch(url)
    ok = match is not None and 0 < int(match["port"]) < 65536
    if match and ok:
        if match["ip6"] is not None:
            try:
                ipaddress.IPv6Address(match["ip6"])
            except ValueError:
                ok = False
        else:
            try:
                ipaddress.ip_address(match["host"])
            except ValueError:
                ok = is_host_name(match["host"])
    if not ok:
        raise ValueError(
            f'LLMDConnector: kv_connector_extra_config[{key!r}] must be "tcp://HOST:PORT" '
            f'(the LMCache server, e.g. "tcp://127.0.0.1:5601"; port 1..65535) or "" (off), '
            f"got {url!r}"
        )


@dataclass(frozen=True)
class LLMDConnectorConfig:
    """`kv_connector_extra_config` keys.

    The comment right above each field is its documentation: scripts/gen_config_reference.py
    copies it into docs/configuration.md (tests/test_docs.py fails when that file is stale).
    """

    # P/D side channel: address the prefill instance's workers listen on for decode pulls (an
    # IP address or a host name). Loopback by default: bind only where an operator says so.
    side_channel_host: str = "127.0.0.1"
    # Base TCP port (0..65535); worker rank r listens on port + r. 0: an ephemeral port per worker,
    # reported to the scheduler half at start-up (fine on one host; pin it for firewalls).
    side_channel_port: int = 0
    # Seconds a prefill instance keeps a finished request's blocks for its decode instance.
    # Every read renews it; a decode instance that never comes frees them when it expires.
    lease_s: float = 30.0
    # Seconds a decode worker waits for one reply of the prefill instance before it gives up
    # and reports the load as failed (vLLM then recomputes or fails, per
    # kv_load_failure_policy).
    transfer_timeout_s: float = 20.0
    # Seconds a decode worker retries a transfer id the prefill worker does not know yet:
    # the prefill engine registers it one step after it answered the request.
    unknown_transfer_grace_s: float = 3.0
    # Largest payload of one reply, a byte size (bytes as an int, or a string with a unit such
    # as "64MiB"): bounds the staging buffer on both sides. A prefill refuses larger reads, so
    # a decode's value must not exceed its prefills'. Buffers are kept for reuse: each pull
    # thread of a decode worker one of this size (pinned with a CUDA cache), a prefill worker
    # up to 4x this for its socket peers. Reads written in place (CUDA IPC) are not bounded.
    max_chunk_bytes: int = 64 << 20
    # Concurrent transfers per decode worker.
    num_transfer_threads: int = 4
    # Milliseconds an engine step that computed nothing may wait for a load of this worker (a
    # P/D pull, a tier load) to end, instead of vLLM stepping again at once. vLLM busy-loops
    # while requests wait only for KV; the wait gives the loading threads the core and the
    # GIL and reports the load the moment it ends. A request arriving meanwhile waits at most
    # this long to be scheduled. 0: never wait.
    idle_wait_ms: float = 2.0
    # Same host, KV on CUDA: the prefill worker writes the blocks straight into the decode
    # worker's GPU cache through CUDA IPC (no host staging). Falls back by itself to shared
    # memory or the socket where the handles cannot be used. Off: never tried.
    cuda_ipc: bool = True
    # Hosts a decode instance may pull prompt KV from (and send releases to): comma-separated
    # host names, IP addresses or CIDR networks, e.g. "10.0.0.0/8,prefill-0.svc". Requests
    # naming another host are recomputed without any connection. "": any host (then only
    # trusted clients, such as the router, may send kv_transfer_params to this instance).
    allowed_prefill_hosts: str = ""
    # Mutual TLS 1.3 on the side channel (off: ""): path of this instance's PEM certificate.
    # Set all three side_channel_tls_* keys on prefill and decode alike (e.g. files of a
    # Kubernetes Secret); then a peer without a certificate signed by side_channel_tls_ca is
    # refused before it can ask for anything, and every byte after the handshake travels in
    # AES-256-GCM records under keys agreed inside it. Host names are not checked (pods are
    # reached by IP): the CA is the pin, so use one for this channel alone. Same-host shared
    # memory and CUDA IPC still move the bytes outside the socket (the host is the trust
    # boundary there).
    side_channel_tls_cert: str = ""
    # Path of the PEM private key of side_channel_tls_cert (unencrypted). "": TLS off.
    side_channel_tls_key: str = ""
    # Path of the PEM CA bundle that signed the peers' certificates (both ways). "": TLS off.
    side_channel_tls_ca: str = ""

    # ---- Offload tiers ----

    # Host memory for offloaded KV for the whole instance (split over its TP workers): bytes as
    # an int, or a string with a unit: "16GiB", "512MiB" (KiB/MiB/GiB/TiB and K/M/G/T are
    # powers of 1024), "2GB" (KB/MB/GB/TB: powers of 1000). 0 turns offloading off. Pinned on
    # CUDA.
    host_offload_bytes: int = 0
    # Folder of the disk tier (one safetensors file per chunk); "" turns the disk tier off.
    # Files written by an earlier run with the same model and layout are loaded at start.
    disk_offload_path: str = ""
    # Disk tier capacity for the whole instance, a byte size (an int or e.g. "100GiB"); 0 with
    # a path: 10 GiB.
    disk_offload_bytes: int = 0
    # Eviction policy of both tiers: "lru" (least recently used first) is the only one.
    offload_policy: OffloadPolicy = "lru"
    # Also offload blocks filled by generated tokens (by default only prompt blocks).
    offload_decode_blocks: bool = False
    # Threads per worker reading and writing the disk tier.
    offload_disk_threads: int = 4
    # Host memory for the whole instance, a byte size (an int or e.g. "64MiB"), through which
    # new blocks go straight to disk when every host slot is pinned (by loads and stores in
    # flight), so a small host tier does not drop them. Used only with a disk tier; 0: such
    # blocks wait for a slot.
    offload_staging_bytes: int = 64 << 20
    # Debugging: a JSON file the scheduler rewrites with the block hashes each tier holds,
    # whenever that changes ({"host": [hex...], "disk": [hex...]}). "" = off.
    debug_state_path: str = ""

    # ---- Shared tier (LMCache) ----

    # LMCache MP server (`lmcache server`) of the shared tier, as "tcp://HOST:PORT", e.g.
    # "tcp://127.0.0.1:5601";
    # "" turns the shared tier off. It must run on this host with --shm-name and
    # --supported-transfer-mode auto; servers sharing one Redis (--l2-adapter) share prefixes
    # across instances and hosts. Needs `pip install 'vllm-llmd[lmcache]'`.
    shared_tier_url: str = ""
    # Seconds one call to the LMCache server may take (a lookup: until it answers). Past it
    # the server counts as down: requests are served by recomputing until it answers again.
    shared_tier_timeout_s: float = 5.0
    # Seconds between pings of the LMCache server (and retries while it is down).
    shared_tier_retry_s: float = 2.0
    # Tokens per shared-tier chunk: must equal the server's --chunk-size and be a multiple of
    # the block size. Only whole chunks of a prompt are shared.
    shared_tier_chunk_tokens: int = 256
    # Store computed prompt chunks to the shared tier (off: this instance only loads).
    shared_tier_store: bool = True
    # Chunks per worker waiting to be stored; beyond it new stores are dropped (counted), so a
    # slow server never holds more host memory or delays a step.
    shared_tier_max_inflight_chunks: int = 32

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> LLMDConnectorConfig:
        """Validate and convert a `kv_connector_extra_config` dict."""
        extra = dict(extra or {})
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(extra) - set(known), key=str)
        if unknown:
            hints = [(key, did_you_mean(str(key), known)) for key in unknown]
            if len(unknown) == 1:
                hint = hints[0][1]
            else:
                hint = "".join(f"; {key!r}{h}" for key, h in hints if h)
            raise ValueError(
                f"LLMDConnector: unknown kv_connector_extra_config key(s) {unknown}{hint}; "
                f"known keys: {known}"
            )
        values: dict[str, Any] = {}
        for name, value in extra.items():
            if name.endswith("_bytes"):
                try:
                    values[name] = parse_byte_size(value)
                except ValueError as exc:
                    raise ValueError(
                        f"LLMDConnector: kv_connector_extra_config[{name!r}]: {exc}"
                    ) from None
                continue
            expected = type(getattr(cls, name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
                raise ValueError(
                    f"LLMDConnector: kv_connector_extra_config[{name!r}] must be "
                    f"{expected.__name__}, got {value!r}"
                )
            values[name] = value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """ValueError naming the first key whose value is out of range or malformed."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"LLMDConnector: {f.name} must be a finite number, got {value}")
        if not 0 <= self.side_channel_port < 65536:
            raise ValueError(
                "LLMDConnector: side_channel_port must be in 0..65535, got "
                f"{self.side_channel_port}"
            )
        check_host("side_channel_host", self.side_channel_host)
        for name in (
            "lease_s",
            "transfer_timeout_s",
            "max_chunk_bytes",
            "num_transfer_threads",
            "offload_disk_threads",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMDConnector: {name} must be > 0, got {getattr(self, name)}")
        self.prefill_host_allowlist()  # refuses a malformed entry at start-up
        for server_side in (True, False):  # a missing key or a bad file: at start-up
            self.side_channel_tls(server_side)
        for name in ("unknown_transfer_grace_s", "idle_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"LLMDConnector: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("host_offload_bytes", "disk_offload_bytes", "offload_staging_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"LLMDConnector: {name} must be >= 0, got {getattr(self, name)}")
        policies = get_args(OffloadPolicy)
        if self.offload_policy not in policies:
            raise ValueError(
                f"LLMDConnector: kv_connector_extra_config['offload_policy'] must be one of "
                f"{list(policies)}, got {self.offload_policy!r}"
                f"{did_you_mean(self.offload_policy, policies)}"
            )
        if self.disk_offload_path and not self.host_offload_bytes:
            raise ValueError(
                "LLMDConnector: disk_offload_path needs host_offload_bytes > 0 (new blocks go "
                "to the host tier first)"
            )
        for name in (
            "shared_tier_timeout_s",
            "shared_tier_retry_s",
            "shared_tier_chunk_tokens",
            "shared_tier_max_inflight_chunks",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMDConnector: {name} must be > 0, got {getattr(self, name)}")
        if self.shared_tier_url:
            check_tcp_url("shared_tier_url", self.shared_tier_url)

    def prefill_host_allowlist(self) -> HostAllowlist | None:
        """`allowed_prefill_hosts` parsed; None when every host is allowed."""
        if not self.allowed_prefill_hosts.strip():
            return None
        return HostAllowlist.parse(self.allowed_prefill_hosts)

    def side_channel_tls(self, server_side: bool) -> ssl.SSLContext | None:
        """The side channel's TLS context for the prefill (server_side) or the decode side,
        one per process (transfer/tls.py); None when TLS is off."""
        paths = {name: getattr(self, name) for name in _TLS_KEYS}
        if not any(paths.values()):
            return None
        missing = [name for name, path in paths.items() if not path]
        if missing:
            raise ValueError(
                f"LLMDConnector: side channel TLS needs all of {list(_TLS_KEYS)}; missing {missing}"
            )
        make = tls.make_server_context if server_side else tls.make_client_context
        return make(*paths.values())

    @property
    def offload_enabled(self) -> bool:
        return self.host_offload_bytes > 0

    def offload_capacity(self, block_bytes: int, num_workers: int) -> tuple[int, int, int]:
        """(host slots, disk files, staging slots) per worker, for offloaded blocks of
        block_bytes per worker (one block of every layer)."""
        per_block = block_bytes * num_workers
        host = self.host_offload_bytes // per_block
        if self.offload_enabled and host == 0:
            raise ValueError(
                f"LLMDConnector: host_offload_bytes {self.host_offload_bytes} is less than one "
                f"block ({per_block} bytes: one block of every layer on every worker)"
            )
        disk = self.disk_bytes // per_block
        staging = max(1, self.offload_staging_bytes // per_block) if disk else 0
        return host, disk, staging if self.offload_staging_bytes else 0

    @property
    def disk_bytes(self) -> int:
        """Disk tier capacity in bytes (0: no disk tier)."""
        if not self.disk_offload_path:
            return 0
        return self.disk_offload_bytes or 10 << 30

    def replace(self, **changes: Any) -> LLMDConnectorConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class HostAllowlist:
    """Host names and IP networks a decode instance may connect to for P/D."""

    names: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, text: str) -> HostAllowlist:
        names, networks = set(), []
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not is_host_name(entry):
                    raise ValueError(
                        f"LLMDConnector: allowed_prefill_hosts entry {entry!r} is neither a "
                        "host name, an IP address nor a CIDR network"
                    ) from None
                names.add(entry.lower())
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str) -> bool:
        """host as written in kv_transfer_params (a name is matched as written, not resolved)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host.lower() in self.names
        return any(address in network for network in self.networks)
