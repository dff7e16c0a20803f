"""LLMDConnector's settings: every key of `kv_connector_extra_config`, typed, with defaults.

An unknown key or a value of the wrong type is refused at start-up with a message naming it;
a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, fields
from typing import Any

from vllm_llmd.transfer.params import is_host_name


@dataclass(frozen=True)
class LLMDConnectorConfig:
    """`kv_connector_extra_config` keys.

    The comment right above each field is its documentation: scripts/gen_config_reference.py
    copies it into docs/configuration.md (tests/test_docs.py fails when that file is stale).
    """

    # P/D side channel: address the prefill instance's workers listen on for decode pulls.
    # Loopback by default: bind only where an operator says so.
    side_channel_host: str = "127.0.0.1"
    # Base TCP port; worker rank r listens on port + r. 0: an ephemeral port per worker,
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
    # Largest payload of one reply (bytes): bounds the staging buffer on both sides. A prefill
    # refuses larger reads, so a decode's value must not exceed its prefills'.
    max_chunk_bytes: int = 64 << 20
    # Concurrent transfers per decode worker.
    num_transfer_threads: int = 4
    # Same host, KV on CUDA: the prefill worker writes the blocks straight into the decode
    # worker's GPU cache through CUDA IPC (no host staging). Falls back by itself to shared
    # memory or the socket where the handles cannot be used. Off: never tried.
    cuda_ipc: bool = True
    # Hosts a decode instance may pull prompt KV from (and send releases to): comma-separated
    # host names, IP addresses or CIDR networks, e.g. "10.0.0.0/8,prefill-0.svc". Requests
    # naming another host are recomputed without any connection. "": any host (then only
    # trusted clients, such as the router, may send kv_transfer_params to this instance).
    allowed_prefill_hosts: str = ""

    # ---- Offload tiers ----

    # Host memory for offloaded KV, in bytes for the whole instance (split over its TP
    # workers); 0 turns offloading off. Pinned on CUDA.
    host_offload_bytes: int = 0
    # Folder of the disk tier (one safetensors file per chunk); "" turns the disk tier off.
    # Files written by an earlier run with the same model and layout are loaded at start.
    disk_offload_path: str = ""
    # Disk tier capacity in bytes for the whole instance; 0 with a path: 10 GiB.
    disk_offload_bytes: int = 0
    # Eviction policy of both tiers.
    offload_policy: str = "lru"
    # Also offload blocks filled by generated tokens (by default only prompt blocks).
    offload_decode_blocks: bool = False
    # Threads per worker reading and writing the disk tier.
    offload_disk_threads: int = 4
    # Host memory, in bytes for the whole instance, through which new blocks go straight to
    # disk when every host slot is pinned (by loads and stores in flight), so a small host
    # tier does not drop them. Used only with a disk tier; 0: such blocks wait for a slot.
    offload_staging_bytes: int = 64 << 20
    # Debugging: a JSON file the scheduler rewrites with the block hashes each tier holds,
    # whenever that changes ({"host": [hex...], "disk": [hex...]}). "" = off.
    debug_state_path: str = ""

    # ---- Shared tier (LMCache) ----

    # LMCache MP server (`lmcache server`) of the shared tier, e.g. "tcp://127.0.0.1:5601";
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
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(
                f"LLMDConnector: unknown kv_connector_extra_config key(s) {unknown}; "
                f"known keys: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for name, value in extra.items():
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
        if not 0 <= self.side_channel_port < 65536:
            raise ValueError(f"LLMDConnector: side_channel_port {self.side_channel_port} invalid")
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
        if self.unknown_transfer_grace_s < 0:
            raise ValueError("LLMDConnector: unknown_transfer_grace_s must be >= 0")
        if min(self.host_offload_bytes, self.disk_offload_bytes, self.offload_staging_bytes) < 0:
            raise ValueError("LLMDConnector: offload byte sizes must be >= 0")
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

    def prefill_host_allowlist(self) -> HostAllowlist | None:
        """`allowed_prefill_hosts` parsed; None when every host is allowed."""
        if not self.allowed_prefill_hosts.strip():
            return None
        return HostAllowlist.parse(self.allowed_prefill_hosts)

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
