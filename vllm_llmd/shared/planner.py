"""Scheduler side of the shared tier: what the LMCache server holds, what to load and store.

Per request, never blocking a step:

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
4. `request_finished`: releases locks still held (the request never got blocks) and ends the
   server's session of the request.

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

from vllm_llmd.log import get_logger
from vllm_llmd.shared.client import SharedTierClient, SharedTierError
from vllm_llmd.shared.messages import SharedLoadSpec, SharedStoreSpec

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


@dataclass(frozen=True)
class SharedTierChange:
    """Prompt blocks [first_block, end_block) of a request entered (or left) the shared tier."""

    request: Request
    first_block: int
    end_block: int
    stored: bool


@dataclass
class _Lookup:
    """One request's lookup on the server."""

    end: int  # tokens looked up: the prompt's full chunks
    sent_at: float
    future: Any  # the RPC in flight (lookup, then query_prefetch_status)
    querying: bool = False
    # hit tokens from 0 once known
    hit: int | None = None
    # the server holds read locks on the hit chunks for this request
    locked: bool = False


class SharedTierPlanner:
    """Lookups, lock bookkeeping and store planning of the scheduler half (no tensors)."""

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
        self._lookups: dict[str, _Lookup] = {}
        # requests whose lookup session is open on the server (ended at request_finished)
        self._sessions: set[str] = set()
        # live requests, and the prompt tokens the server holds or was sent (chunk multiple)
        self._requests: dict[str, Request] = {}
        self._offered: dict[str, int] = {}
        self._loads: list[SharedLoadSpec] = []
        self._stores: list[SharedStoreSpec] = []
        # stores sent to the workers: key -> (what it adds, [succeeded, failed] reports)
        self._unconfirmed: dict[bytes, tuple[SharedTierChange, list[int]]] = {}
        self._changes: list[SharedTierChange] = []

    # ---- lookups -------------------------------------------------------------------------

    def hit(self, request: Request, num_local_tokens: int = 0) -> int | None:
        """Prompt tokens from token 0 the shared tier holds (whole chunks); None: ask again.

        num_local_tokens: what the device cache and our tiers hold; when that covers every
        full chunk there is nothing to look up (nor to store: it was stored when computed).
        """
        rid = request.request_id
        state = self._lookups.get(rid)
        if state is None:
            end = len(request.prompt_token_ids or ()) // self.chunk_tokens * self.chunk_tokens
            if end == 0 or _salt(request) is None:
                return 0
            self._requests[rid] = request  # its chunks may be stored
            if num_local_tokens >= end:
                self._offered[rid] = max(self._offered.get(rid, 0), end)
                return 0
            if not self.client.is_up:
                return 0
            try:
                future = self.client.submit("lookup", self._key(request, 0, end), 1)
            except SharedTierError:
                return 0
            self._sessions.add(rid)
            self._lookups[rid] = _Lookup(end, time.monotonic(), future)
            return None
        if state.hit is not None:
            return state.hit
        return self._poll(rid, state)

    def _poll(self, rid: str, state: _Lookup) -> int | None:
        if not state.future.query():
            if time.monotonic() - state.sent_at > self.client.timeout_s:
                self.client.mark_down(f"lookup got no answer in {self.client.timeout_s:g}s")
                state.hit = 0  # any locks it took expire with the server's read-lock TTL
                return 0
            return None
        try:
            answer = self.client.wait(state.future, "lookup", 0)
            if not state.querying or answer is None:
                state.querying = True
                state.future = self.client.submit("query_prefetch_status", rid)
                return None
        except SharedTierError as exc:
            logger.warning("LLMDConnector shared tier: lookup of %s failed: %s", rid, exc)
            state.hit = 0
            return 0
        state.hit = min(int(answer) * self.chunk_tokens, state.end)
        state.locked = state.hit > 0
        self._offered[rid] = max(self._offered.get(rid, 0), state.hit)
        self._note_lookup(self._requests[rid], state.hit, state.end)
        return state.hit

    def _note_lookup(self, request: Request, hit: int, end: int) -> None:
        hit_blocks = hit // self.block_size
        if hit_blocks:
            self._changes.append(SharedTierChange(request, 0, hit_blocks, stored=True))
        if hit < end:
            self._changes.append(SharedTierChange(request, hit_blocks, hit_blocks + 1, False))

    # ---- after allocation ----------------------------------------------------------------

    def plan_load(self, request: Request, first_token: int, block_ids: list[int]) -> None:
        """The load of tokens first_token..hit into block_ids (one per block from first_token).

        first_token is block-aligned; the chunk it falls in is read whole and its leading
        blocks skipped. Locks of chunks before that one are released here.
        """
        state = self._lookups.pop(request.request_id, None)
        if state is None or not state.hit or first_token >= state.hit:
            if state is not None:
                self._free_locks(request, state, 0)
            return
        start = first_token // self.chunk_tokens * self.chunk_tokens
        if start > 0:
            self._free_locks(request, state, 0, start)
        state.locked = False  # the rest is released by the workers' commit_retrieve
        spec = SharedLoadSpec(
            request_id=request.request_id,
            token_ids=tuple(request.prompt_token_ids[: state.hit]),
            start=start,
            end=state.hit,
            skip_blocks=(first_token - start) // self.block_size,
            block_ids=tuple(block_ids),
            num_tokens=state.hit - first_token,
            cache_salt=_salt(request) or "",
        )
        assert len(block_ids) == (spec.end - first_token) // self.block_size, (first_token, spec)
        self._loads.append(spec)

    def release(self, request: Request) -> None:
        """vLLM will not load this request's hit (now): release its locks, forget the lookup."""
        state = self._lookups.pop(request.request_id, None)
        if state is not None:
            self._free_locks(request, state, 0)

    # ---- stores --------------------------------------------------------------------------

    def plan_stores(self, scheduler_output: SchedulerOutput) -> None:
        block_state = scheduler_output.kv_connector_block_state
        if not self.store or block_state is None:
            return
        for rid, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(rid)
            salt = _salt(request) if request is not None else None
            if request is None or salt is None:
                continue
            prompt = request.prompt_token_ids or ()
            computed = min(request.num_computed_tokens + num_scheduled, len(prompt))
            end = computed // self.chunk_tokens * self.chunk_tokens
            start = self._offered.get(rid, 0)
            if end <= start:
                continue
            (block_ids, *_) = block_state.get_block_ids(rid) or ([],)
            ids = block_ids[start // self.block_size : end // self.block_size]
            if len(ids) != (end - start) // self.block_size:
                continue
            spec = SharedStoreSpec(rid, tuple(prompt[:end]), start, end, tuple(ids), salt)
            self._stores.append(spec)
            self._offered[rid] = end
            change = SharedTierChange(
                request, start // self.block_size, end // self.block_size, stored=True
            )
            self._unconfirmed[spec.key] = (change, [0, 0])

    def on_store_results(self, results: dict[bytes, list[int]]) -> None:
        """Workers' reports of ended stores (summed over the workers of this step)."""
        for key, (succeeded, failed) in results.items():
            entry = self._unconfirmed.get(key)
            if entry is None:
                continue  # not ours to track (reported twice after a fault-tolerance retry)
            change, counts = entry
            counts[0] += succeeded
            counts[1] += failed
            if sum(counts) >= self.world_size:
                del self._unconfirmed[key]
                if counts[1] == 0:
                    self._changes.append(change)

    def take_changes(self) -> list[SharedTierChange]:
        """What the tier gained or lost since the last call, as far as this instance knows."""
        changes, self._changes = self._changes, []
        return changes

    def take_step(self) -> tuple[list[SharedLoadSpec], list[SharedStoreSpec]]:
        """This step's loads and stores for the workers."""
        step = (self._loads, self._stores)
        self._loads, self._stores = [], []
        return step

    def request_finished(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        self._offered.pop(request.request_id, None)
        self.release(request)
        if request.request_id in self._sessions:
            self._sessions.discard(request.request_id)
            try:
                self.client.submit("end_session", request.request_id)
            except SharedTierError:
                pass  # the server's session TTL removes it

    def _free_locks(
        self, request: Request, state: _Lookup, start: int, end: int | None = None
    ) -> None:
        end = state.hit if end is None else end
        if not state.locked or not end or start >= end:
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
