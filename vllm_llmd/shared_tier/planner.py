"""Scheduler side of the shared tier: what the LMCache server holds, what to load and store.

The shared tier of the scheduler half's tier loop (`vllm_llmd/connector/tier.py`); its part of
each request lives in `RequestState` (`shared_*` fields: the lookup, the session, what was
offered). Per request, never blocking a step:

1. `hit` (from get_num_new_matched_tokens) sends `lookup` (the server hashes the prompt's full
   chunks, prefetches them from Redis into its memory and read-locks them under the request
   id), then polls `query_prefetch_status` on later calls; None ("ask again next step") until it
   answers, then the hit in tokens from token 0 (whole chunks). A server that does not answer
   within `timeout_s` counts as a miss and is marked down (lookups then miss at once).
2. `plan_load` (from update_state_after_alloc) hands the chunks to load to the workers (each
   worker's `commit_retrieve` releases them) and releases the locks of the chunks it will not
   load; `release` releases them all when vLLM loads nothing.
3. `plan_stores` (from build_connector_meta): prompt chunks that became fully computed this
   step and that the server did not hold at lookup go to the workers to store.
4. `finish` (from request_finished): releases locks still held (the request never got blocks)
   and ends the server's session of the request.

What the tier holds, for KV events (`take_changes`, published with medium SHARED so a router
can count the tier as a saving on every pod): a lookup's answer is a fact about the server at
that moment: its hit blocks are *stored* (announced again on every hit, which keeps a
consumer's time-bounded view fresh), and the first block of the first chunk it lacks is
*removed* (a consumer's run of the prompt stops there; one hash cuts it, so a miss costs one
event, not one per block). A store is announced once every worker reported it done (the
server took the chunks or already held them); a dropped or failed store is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.log import get_logger
from vllm_llmd.shared_tier.client import SharedTierClient, SharedTierError
from vllm_llmd.shared_tier.lookup import SharedLookup
from vllm_llmd.shared_tier.messages import SharedLoadSpec, SharedStoreSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from vllm_llmd.connector.metadata import LLMDConnectorMetadata
    from vllm_llmd.connector.request_state import RequestState

logger = get_logger(__name__)


@dataclass(frozen=True)
class SharedTierChange:
    """Prompt blocks [first_block, end_block) of a request entered (or left) the shared tier."""

    request: Request
    first_block: int
    end_block: int
    stored: bool


class SharedTierPlanner:
    """The shared tier's `TierPlanner`: lookups, lock bookkeeping and store planning of the
    scheduler half (no tensors)."""

    def __init__(
        self,
        client: SharedTierClient,
        model_name: str,
        world_size: int,
        block_size: int,
        chunk_tokens: int,
        store: bool = True,
    ) -> None:
        self.client = client
        self.store = store
        self.model_name = model_name
        self.world_size = world_size
        self.block_size = block_size
        self.chunk_tokens = chunk_tokens
        self._loads: list[SharedLoadSpec] = []
        self._stores: list[SharedStoreSpec] = []
        # stores sent to the workers: key -> what it adds, and their reports until all are in
        self._unconfirmed: dict[bytes, SharedTierChange] = {}
        self._reports = JobTally()
        self._changes: list[SharedTierChange] = []

    # ---- lookups -------------------------------------------------------------------------

    def hit(self, state: RequestState, num_local_tokens: int) -> int | None:
        """Prompt tokens from token 0 the shared tier holds (whole chunks); None: ask again.

        num_local_tokens: what the device cache and our tiers hold; when that covers every
        full chunk there is nothing to look up (nor to store: it was stored when computed).
        """
        request = state.request
        lookup = state.shared_lookup
        if lookup is None:
            end = len(request.prompt_token_ids or ()) // self.chunk_tokens * self.chunk_tokens
            if end == 0 or _salt(request) is None:
                return 0
            if num_local_tokens >= end:
                state.shared_offered = max(state.shared_offered, end)
                return 0
            if not self.client.is_up:
                return 0
            try:
                future = self.client.submit("lookup", self._key(request, 0, end), 1)
            except SharedTierError:
                return 0
            state.shared_session = True
            state.shared_lookup = SharedLookup(end, time.monotonic(), future)
            return None
        if lookup.hit is not None:
            return lookup.hit
        return self._poll(state, lookup)

    def _poll(self, state: RequestState, lookup: SharedLookup) -> int | None:
        rid = state.request_id
        if not lookup.future.query():
            if time.monotonic() - lookup.sent_at > self.client.timeout_s:
                self.client.mark_down(f"lookup got no answer in {self.client.timeout_s:g}s")
                lookup.hit = 0  # any locks it took expire with the server's read-lock TTL
                return 0
            return None
        try:
            answer = self.client.wait(lookup.future, "lookup", 0)
            if not lookup.querying or answer is None:
                # "not done yet" is asked again each step, but not past the call timeout
                if lookup.querying and time.monotonic() - lookup.sent_at > self.client.timeout_s:
                    raise SharedTierError(f"lookup not done in {self.client.timeout_s:g}s")
                lookup.querying = True
                lookup.future = self.client.submit("query_prefetch_status", rid)
                return None
            if isinstance(answer, bool) or not isinstance(answer, int):
                raise SharedTierError(f"query_prefetch_status answered {answer!r}, not a count")
        except SharedTierError as exc:  # any locks it took expire with the server's lock TTL
            logger.warning("LLMDConnector shared tier: lookup of %s failed: %s", rid, exc)
            lookup.hit = 0
            return 0
        lookup.hit = max(0, min(answer * self.chunk_tokens, lookup.end))
        lookup.locked = lookup.hit > 0
        state.shared_offered = max(state.shared_offered, lookup.hit)
        self._note_lookup(state.request, lookup.hit, lookup.end)
        return lookup.hit

    def _note_lookup(self, request: Request, hit: int, end: int) -> None:
        hit_blocks = hit // self.block_size
        if hit_blocks:
            self._changes.append(SharedTierChange(request, 0, hit_blocks, stored=True))
        if hit < end:
            self._changes.append(SharedTierChange(request, hit_blocks, hit_blocks + 1, False))

    # ---- after allocation ----------------------------------------------------------------

    def plan_load(self, state: RequestState, first_token: int, block_ids: list[int]) -> None:
        """The load of tokens first_token..hit into block_ids (one per block from first_token).

        first_token is block-aligned; the chunk it falls in is read whole and its leading
        blocks skipped. Locks of chunks before that one are released here.
        """
        request = state.request
        lookup, state.shared_lookup = state.shared_lookup, None
        if lookup is None or not lookup.hit or first_token >= lookup.hit:
            if lookup is not None:
                self._free_locks(request, lookup, 0)
            return
        start = first_token // self.chunk_tokens * self.chunk_tokens
        if start > 0:
            self._free_locks(request, lookup, 0, start)
        lookup.locked = False  # the rest is released by the workers' commit_retrieve
        spec = SharedLoadSpec(
            request_id=request.request_id,
            token_ids=tuple(request.prompt_token_ids[: lookup.hit]),
            start=start,
            end=lookup.hit,
            skip_blocks=(first_token - start) // self.block_size,
            block_ids=tuple(block_ids),
            num_tokens=lookup.hit - first_token,
            cache_salt=_salt(request) or "",
        )
        assert len(block_ids) == (spec.end - first_token) // self.block_size, (first_token, spec)
        self._loads.append(spec)

    def release(self, state: RequestState) -> None:
        """vLLM will not load this request's hit (now): release its locks, forget the lookup."""
        lookup, state.shared_lookup = state.shared_lookup, None
        if lookup is not None:
            self._free_locks(state.request, lookup, 0)

    def complete_load(self, state: RequestState, ok: bool) -> None:
        return None  # each worker's commit_retrieve released the loaded chunks

    # ---- stores --------------------------------------------------------------------------

    def plan_stores(
        self, scheduled: Sequence[tuple[RequestState, int]], scheduler_output: SchedulerOutput
    ) -> None:
        block_state = scheduler_output.kv_connector_block_state
        if not self.store or block_state is None:
            return
        for state, num_scheduled in scheduled:
            request, rid = state.request, state.request_id
            salt = _salt(request)
            if salt is None:
                continue
            prompt = request.prompt_token_ids or ()
            computed = min(request.num_computed_tokens + num_scheduled, len(prompt))
            end = computed // self.chunk_tokens * self.chunk_tokens
            start = state.shared_offered
            if end <= start:
                continue
            (block_ids, *_) = block_state.get_block_ids(rid) or ([],)
            ids = block_ids[start // self.block_size : end // self.block_size]
            if len(ids) != (end - start) // self.block_size:
                continue
            spec = SharedStoreSpec(rid, tuple(prompt[:end]), start, end, tuple(ids), salt)
            self._stores.append(spec)
            state.shared_offered = end
            self._unconfirmed[spec.key] = SharedTierChange(
                request, start // self.block_size, end // self.block_size, stored=True
            )

    def on_results(self, results: JobTally) -> None:
        """Workers' reports of ended stores (summed over the workers of this step)."""
        for kind, key, succeeded, failed in results.of(JobKind.SHARED_STORE):
            # a key not ours to track was reported twice (after a fault-tolerance retry)
            if key in self._unconfirmed:
                self._reports.add(kind, key, succeeded, failed)
        for _, key, ok in self._reports.take_settled(self.world_size):
            change = self._unconfirmed.pop(key)
            if ok:
                self._changes.append(change)

    def take_changes(self) -> list[SharedTierChange]:
        """What the tier gained or lost since the last call, as far as this instance knows."""
        changes, self._changes = self._changes, []
        return changes

    def take_step(self, metadata: LLMDConnectorMetadata) -> None:
        """This step's loads and stores for the workers."""
        metadata.shared_loads, metadata.shared_stores = self._loads, self._stores
        self._loads, self._stores = [], []

    def finish(self, state: RequestState) -> None:
        self.release(state)
        if state.shared_session:
            state.shared_session = False
            try:
                self.client.submit("end_session", state.request_id)
            except SharedTierError:
                pass  # the server's session TTL removes it

    def _free_locks(
        self, request: Request, lookup: SharedLookup, start: int, end: int | None = None
    ) -> None:
        end = lookup.hit if end is None else end
        if not lookup.locked or not end or start >= end:
            return
        try:
            self.client.submit("free_lookup_locks", self._key(request, start, end), 1)
        except SharedTierError:
            pass  # they expire with the server's read-lock TTL

    def _key(self, request: Request, start: int, end: int) -> Any:
        return self.client.lmcache.IPCCacheServerKey(
            model_name=self.model_name,
            world_size=self.world_size,
            worker_id=None,
            token_ids=tuple(request.prompt_token_ids or ()),
            start=start,
            end=end,
            request_id=request.request_id,
            cache_salt=_salt(request) or "",
            num_kv_readers=self.world_size,
        )

    def close(self) -> None:
        self.client.close()


def _salt(request: Request) -> str | None:
    """The request's cache salt as LMCache takes it, or None if LMCache refuses it."""
    salt = getattr(request, "cache_salt", None) or ""
    if len(salt) > 128 or set(salt) & set("@/\\\x00"):
        return None
    return salt
