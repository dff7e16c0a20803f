"""The scheduler half's tier events, driven through its vLLM hooks (no engine needed):
stores and evictions become vLLM BlockStored/BlockRemoved, a cache reset AllBlocksCleared, and
nothing at all is built while vLLM's event publisher is off."""

from __future__ import annotations

import msgspec
import pytest
from factories import make_scheduler
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from vllm.v1.outputs import KVConnectorOutput

from vllm_llmd.connector.metadata import LLMDWorkerMetadata
from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
from vllm_llmd.connector.tier_events import BlockInfo
from vllm_llmd.hashing import PrefixHasher, to_event_hash
from vllm_llmd.job_tally import JobKind, JobTally

BLOCK = 32
TOKENS = list(range(100, 100 + 2 * BLOCK))
KEYS = PrefixHasher(BLOCK).block_hashes(TOKENS)


def _scheduler(publish: bool, host_slots: int = 1) -> LLMDConnectorScheduler:
    return make_scheduler(engine_id="engine", host_slots=host_slots, publish_events=publish)


def _store(scheduler: LLMDConnectorScheduler, index: int) -> None:
    """What plan_stores + the worker's report do for block `index` of TOKENS."""
    info = msgspec.json.encode(
        BlockInfo(
            KEYS[index - 1].hex() if index else None, TOKENS[index * BLOCK : (index + 1) * BLOCK]
        )
    ).decode()
    scheduler.offload.manager.prepare_store([KEYS[index]], [info])
    meta = LLMDWorkerMetadata(JobTally({JobKind.STORE: {KEYS[index]: [1, 0]}}))
    scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=meta))


def test_stores_evictions_and_reset_become_vllm_events():
    scheduler = _scheduler(publish=True)
    _store(scheduler, 0)
    _store(scheduler, 1)  # one host slot: evicts block 0
    assert scheduler.reset_cache()
    events = scheduler.take_events()
    # The reset is one AllBlocksCleared (as vLLM's own reset), not a removal per block.
    assert [type(e) for e in events] == [BlockStored, BlockRemoved, BlockStored, AllBlocksCleared]
    first, removed, second = events[0], events[1], events[2]
    assert first.block_hashes == [to_event_hash(KEYS[0])] and first.parent_block_hash is None
    assert second.parent_block_hash == to_event_hash(KEYS[0])
    assert second.token_ids == TOKENS[BLOCK:] and second.block_size == BLOCK
    assert first.medium == second.medium == removed.medium == "CPU"
    # They travel in vLLM's own batch type, and decode back.
    payload = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=events, data_parallel_rank=0))
    assert msgspec.msgpack.decode(payload, type=KVEventBatch).events == events
    assert scheduler.take_events() == []


def test_no_events_without_vllm_publisher():
    scheduler = _scheduler(publish=False)
    _store(scheduler, 0)
    scheduler.reset_cache()
    assert scheduler.take_events() == []


@pytest.mark.parametrize("publish", [True, False])
def test_reset_empties_the_tiers(publish):
    scheduler = _scheduler(publish, host_slots=4)
    _store(scheduler, 0)
    _store(scheduler, 1)
    assert scheduler.offload.manager.lookup(KEYS) == (2, 2)
    scheduler.reset_cache()
    assert scheduler.offload.manager.lookup(KEYS) == (0, 0)
