"""Scheduler half of LLMDConnector: runs in the engine-core process, owns "what is where".

Hooks vLLM calls on this half, in order, for each request:
`get_num_new_matched_tokens` → `update_state_after_alloc` → `build_connector_meta` (every step)
→ `request_finished` (once, before the request's blocks are freed).

P/D, prefill side (`kv_producer`/`kv_both`): a request sent with
`kv_transfer_params={"do_remote_decode": true}` finishes normally; `request_finished` then keeps
its blocks (`delay_free`) and answers with `RemotePrefillParams`. The worker half holds them
until the decode instance releases them, or the lease expires.

P/D, decode side (`kv_consumer`/`kv_both`): a request carrying those params reports the prompt
tokens its local prefix cache lacks as one async external load; `update_state_after_alloc` maps
the remote blocks onto the blocks vLLM allocated, and the worker half pulls them. When the
decode side will not load (whole prompt cached locally, another prompt, bad params, aborted
first), it still releases the prefill's blocks at once.

Offload tiers (`host_offload_bytes` > 0), every role: the tiers are asked first, right after
the device prefix cache; on a decode instance the remote prefill covers only what the device
cache and the tiers lack. Both parts form one async load. See `offload_planner.py`.

Shared tier (`shared_tier_url`), every role: asked after the host/disk tiers and before the
remote prefill; it covers whole LMCache chunks from token 0, so it adds what lies past the
device cache and our tiers. Its lookup is async (None: ask again next step); its load is one
more part of the request's async load. See `vllm_llmd/shared/planner.py`.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.v1.request import RequestStatus

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import (
    SHARED_STORE,
    LLMDConnectorMetadata,
    LLMDHandshake,
    LLMDWorkerMetadata,
    RecvSpec,
    ReleaseSpec,
    SendSpec,
)
from vllm_llmd.connector.offload_planner import OffloadPlanner
from vllm_llmd.connector.tier_events import all_cleared, shared_tier_events, to_kv_events
from vllm_llmd.log import get_logger
from vllm_llmd.transfer.messages import KVLayoutFingerprint
from vllm_llmd.transfer.params import (
    ParamsError,
    RemotePrefillParams,
    is_llmd_remote_prefill,
    prompt_digest,
    wants_remote_decode,
)

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from vllm_llmd.shared.planner import SharedTierPlanner

logger = get_logger(__name__)

# A prefill hands off KV only for requests that ended normally; aborts free at once.
_HANDOFF_STATUSES = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


class LLMDConnectorScheduler:
    """Plans P/D sends, pulls and releases for each step. It holds no tensors."""

    def __init__(
        self,
        config: LLMDConnectorConfig,
        engine_id: str,
        fingerprint: KVLayoutFingerprint,
        is_producer: bool,
        is_consumer: bool,
        offload: OffloadPlanner | None = None,
        publish_events: bool = False,
        shared: SharedTierPlanner | None = None,
    ) -> None:
        self.config = config
        self.offload = offload
        self.shared = shared
        # vLLM's KV-event publisher is on: announce our tiers' changes on it
        self.publish_events = publish_events
        self._events: list[KVCacheEvent] = []
        self._state_version = -1
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.block_size = fingerprint.block_size
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        # side-channel port per TP rank, learned from the workers' handshake at start-up
        self.side_channel_ports: tuple[int, ...] | None = None
        self._allowed_hosts = config.prefill_host_allowlist()
        # this step's work for the worker half; drained by build_connector_meta
        self._sends: list[SendSpec] = []
        self._recvs: list[RecvSpec] = []
        self._releases: list[ReleaseSpec] = []
        # request id -> (local computed tokens, tokens from our tiers, tokens from the shared
        # tier, remote prefill or None), as the last get_num_new_matched_tokens decided; used by
        # update_state_after_alloc
        self._decisions: dict[str, tuple[int, int, int, RemotePrefillParams | None]] = {}

    # ---- start-up ------------------------------------------------------------------------

    def set_worker_handshakes(self, handshakes: dict[int, LLMDHandshake]) -> None:
        ranks = sorted(handshakes)
        if ranks != list(range(self.fingerprint.tensor_parallel_size)):
            raise RuntimeError(f"LLMDConnector: handshakes from TP ranks {ranks}, expected all")
        ports = tuple(handshakes[r].side_channel_port for r in ranks)
        if all(port is not None for port in ports):
            self.side_channel_ports = ports  # type: ignore[assignment]
            logger.info(
                "LLMDConnector: P/D side channel on %s ports %s",
                self.config.side_channel_host,
                list(ports),
            )

    # ---- decode side ---------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        offload_tokens = 0
        if self.offload is not None:
            hit = self.offload.hit(request, num_computed_tokens)
            if hit is None:
                return None, False  # disk chunks on their way to host memory
            offload_tokens = hit
        num_local = num_computed_tokens + offload_tokens
        shared_tokens = 0
        if self.shared is not None:
            shared_hit = self.shared.hit(request, num_local)
            if shared_hit is None:
                return None, False  # the LMCache server has not answered the lookup yet
            shared_tokens = max(0, shared_hit - num_local)
        remote = self._usable_remote(request, num_local + shared_tokens)
        decision = (num_computed_tokens, offload_tokens, shared_tokens, remote)
        self._decisions[request.request_id] = decision
        if remote is not None:
            num_external = remote.num_tokens - num_computed_tokens
        else:
            num_external = offload_tokens + shared_tokens
        return num_external, num_external > 0

    def _usable_remote(self, request: Request, num_local_tokens: int) -> RemotePrefillParams | None:
        """The remote prefill to pull the rest of the prompt from, if any (else release it)."""
        if not (self.is_consumer and is_llmd_remote_prefill(request.kv_transfer_params)):
            return None
        remote, problem = self._check_remote(request)
        if problem:
            self._release_remote(request, problem, remote)
            return None
        assert remote is not None
        if remote.num_tokens <= num_local_tokens:
            self._release_remote(request, "prompt fully cached on the decode instance", remote)
            return None
        return remote

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        decision = self._decisions.pop(request.request_id, None)
        if decision is None:
            return
        num_computed, offload_tokens, shared_tokens, remote = decision
        if num_external_tokens == 0:  # vLLM chose not to load (e.g. capped the hit)
            if remote is not None:
                self._release_remote(request, "the decode instance did not load it")
            if self.shared is not None:
                self.shared.release(request)
            return
        block_ids = blocks.get_block_ids()[0]
        first = num_computed // self.block_size
        if offload_tokens:
            num_blocks = offload_tokens // self.block_size
            assert self.offload is not None
            self.offload.plan_load(request, first, block_ids[first : first + num_blocks])
        if self.shared is not None:
            first_shared = num_computed + offload_tokens
            if shared_tokens:
                first = first_shared // self.block_size
                num_blocks = shared_tokens // self.block_size
                ids = block_ids[first : first + num_blocks]
                self.shared.plan_load(request, first_shared, ids)
            else:
                self.shared.release(request)
        if remote is not None:
            local_tokens = num_computed + offload_tokens + shared_tokens
            self._plan_pull(request, remote, local_tokens, block_ids)

    def _plan_pull(
        self,
        request: Request,
        remote: RemotePrefillParams,
        num_local_tokens: int,
        block_ids: list[int],
    ) -> None:
        first = num_local_tokens // self.block_size
        last = math.ceil(remote.num_tokens / self.block_size)
        local_block_ids = block_ids[first:last]
        remote_block_ids = remote.block_ids[first:last]
        if len(local_block_ids) != len(remote_block_ids) or len(remote_block_ids) != last - first:
            # Cannot happen for params our prefill made for this prompt; recompute if it does.
            logger.error(
                "LLMDConnector: request %s: %d local vs %d remote blocks for tokens %d..%d; "
                "the load is reported failed",
                request.request_id,
                len(local_block_ids),
                len(remote_block_ids),
                first * self.block_size,
                remote.num_tokens,
            )
            remote_block_ids = ()
        self._recvs.append(
            RecvSpec(
                request_id=request.request_id,
                host=remote.host,
                ports=remote.ports,
                transfer_id=remote.transfer_id,
                fingerprint=remote.fingerprint,
                remote_block_ids=tuple(remote_block_ids),
                local_block_ids=tuple(local_block_ids),
                num_tokens=remote.num_tokens - num_local_tokens,
            )
        )
        # a later preemption recomputes instead
        request.kv_transfer_params["do_remote_prefill"] = False

    def _check_remote(self, request: Request) -> tuple[RemotePrefillParams | None, str]:
        """(params, "") when this request may pull them; else (params or None, the problem).

        The params come from the decode instance's API client: each check here stands between
        a crafted request and a connection, a pinned block or a cached block."""
        try:
            remote = RemotePrefillParams.from_dict(request.kv_transfer_params)
        except ParamsError as exc:
            logger.error("LLMDConnector: request %s: %s; recomputing", request.request_id, exc)
            return None, str(exc)
        num_prompt = len(request.prompt_token_ids or ())
        if self._allowed_hosts is not None and not self._allowed_hosts.allows(remote.host):
            logger.error(
                "LLMDConnector: request %s: prefill host %r is not in allowed_prefill_hosts; "
                "recomputing",
                request.request_id,
                remote.host,
            )
            return None, "prefill host not allowed"  # and no release: no connection to it
        if len(remote.ports) != self.fingerprint.tensor_parallel_size:
            problem = (
                f"prefill has tensor-parallel size {len(remote.ports)}, this decode instance "
                f"{self.fingerprint.tensor_parallel_size}; unequal TP sizes are not supported"
            )
        elif remote.fingerprint != self.fingerprint:
            problem = "KV layouts differ (prefill vs decode): " + "; ".join(
                remote.fingerprint.differences(self.fingerprint)
            )
        elif remote.num_tokens > num_prompt:
            problem = f"params cover {remote.num_tokens} tokens, the prompt has {num_prompt}"
        elif prompt_digest(list(request.prompt_token_ids or ())) != remote.prompt_digest:
            problem = "the prefill ran another prompt (token ids differ)"
        else:
            return remote, ""
        logger.error("LLMDConnector: request %s: %s; recomputing", request.request_id, problem)
        return remote, problem

    def _release_remote(
        self, request: Request, reason: str, remote: RemotePrefillParams | None = None
    ) -> None:
        """Queue a release of the prefill's blocks, once; this request will not load them.

        Only params that passed `from_dict` and the host allowlist are released: with anything
        else there is nowhere safe to send it, and the prefill's lease frees the blocks."""
        request.kv_transfer_params["do_remote_prefill"] = False
        if remote is None:
            return
        if self._allowed_hosts is not None and not self._allowed_hosts.allows(remote.host):
            return
        self._releases.append(ReleaseSpec(remote.host, remote.ports, remote.transfer_id, reason))

    # ---- every step ----------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LLMDConnectorMetadata:
        metadata = LLMDConnectorMetadata(self._sends, self._recvs, self._releases)
        self._sends, self._recvs, self._releases = [], [], []
        if self.offload is not None:
            self.offload.plan_stores(scheduler_output)
            metadata.offload_loads, metadata.offload_step = self.offload.take_step()
            self._collect_tier_changes()
        if self.shared is not None:
            self.shared.plan_stores(scheduler_output)
            metadata.shared_loads, metadata.shared_stores = self.shared.take_step()
        return metadata

    def _collect_tier_changes(self) -> None:
        assert self.offload is not None
        changes = self.offload.take_events()
        if self.publish_events and changes:
            self._events.extend(to_kv_events(changes, self.block_size))
        if self.config.debug_state_path and self.offload.manager.version != self._state_version:
            self._state_version = self.offload.manager.version
            write_json_atomic(self.config.debug_state_path, self.offload.tier_state())

    def take_events(self) -> list[KVCacheEvent]:
        if self.shared is not None:
            changes = self.shared.take_changes()
            if self.publish_events and changes:
                self._events.extend(shared_tier_events(changes, self.block_size))
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> bool:
        """vLLM reset its prefix cache: drop the tiers too, and say so on the event stream."""
        if self.offload is not None:
            self.offload.reset()
            self._collect_tier_changes()
            if self.publish_events:
                self._events.append(all_cleared())
        return True

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        worker_meta = connector_output.kv_connector_worker_meta
        results = worker_meta.results if isinstance(worker_meta, LLMDWorkerMetadata) else {}
        if self.shared is not None and SHARED_STORE in results:
            self.shared.on_store_results(results[SHARED_STORE])
        if self.offload is None:
            return
        offload_results = {kind: r for kind, r in results.items() if kind != SHARED_STORE}
        if offload_results:
            self.offload.on_worker_output(offload_results)
        if connector_output.finished_recving:
            self.offload.on_load_finished(set(connector_output.finished_recving))
        self._collect_tier_changes()

    # ---- prefill side --------------------------------------------------------------------

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._decisions.pop(request.request_id, None)
        if self.offload is not None:
            self.offload.request_finished(request)
        if self.shared is not None:
            self.shared.request_finished(request)
        params = request.kv_transfer_params
        if is_llmd_remote_prefill(params):  # decode side, finished before it ever loaded
            if self.is_consumer:
                remote, _ = self._check_remote(request)
                reason = f"decode request ended first ({request.status.name})"
                self._release_remote(request, reason, remote)
            return False, None
        if not (self.is_producer and wants_remote_decode(params)):
            return False, None
        prompt = list(request.prompt_token_ids or ())
        num_tokens = min(len(prompt), request.num_computed_tokens)
        num_blocks = math.ceil(num_tokens / self.block_size)
        if request.status not in _HANDOFF_STATUSES or num_tokens == 0:
            return False, None
        if self.side_channel_ports is None:
            logger.error("LLMDConnector: no side channel (no kv_producer worker); cannot hand off")
            return False, None
        transfer_id = secrets.token_urlsafe(24)
        self._sends.append(SendSpec(request.request_id, transfer_id, tuple(block_ids[:num_blocks])))
        answer = RemotePrefillParams(
            engine_id=self.engine_id,
            request_id=request.request_id,
            host=self.config.side_channel_host,
            ports=self.side_channel_ports,
            block_ids=tuple(block_ids[:num_blocks]),
            num_tokens=num_tokens,
            transfer_id=transfer_id,
            fingerprint=self.fingerprint,
            prompt_digest=prompt_digest(prompt),
        )
        return True, answer.to_dict()


def write_json_atomic(path: str, obj: object) -> None:
    """Replace path's content with obj as JSON; readers never see a partial file."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temp.write_bytes(msgspec.json.encode(obj))
    os.replace(temp, target)
