"""P/D between instances of unequal TP sizes without vLLM engines (issue 25): the rank/head
mapping, the fingerprint comparison the decode's scheduler half makes, and whole instances of
decode workers (`KVPuller`) pulling from prefill workers (real TransferServers over loopback)
for each (P, D), byte-exact against plain torch indexing of one model-wide KV cache."""

from __future__ import annotations

import threading

import msgspec
import pytest
import torch
from factories import BLOCK, make_fingerprint, make_request, make_scheduler, remote_prefill_params

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.connector import make_offload_planner
from vllm_llmd.connector.kv_pull import KVPuller
from vllm_llmd.connector.metadata import RecvSpec
from vllm_llmd.offload.disk_store import DiskBlockStore
from vllm_llmd.offload.paths import disk_tier_folder
from vllm_llmd.ops import PagedKVCache, gather_blocks
from vllm_llmd.transfer.head_slices import HeadSlicer
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry
from vllm_llmd.transfer.server import TransferServer
from vllm_llmd.transfer.tp_mapping import (
    HeadRead,
    consumers,
    head_reads,
    rank_heads,
    unread_ranks_released_by,
)

SIZES = [(1, 2), (2, 1), (1, 4), (4, 2), (2, 4)]


# ---- the mapping -------------------------------------------------------------------------


def test_vllms_split_of_heads_over_ranks():
    assert [rank_heads(r, 2, 8) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [rank_heads(r, 4, 2) for r in range(4)] == [range(0, 1)] * 2 + [range(1, 2)] * 2
    with pytest.raises(ValueError, match="do not split"):
        rank_heads(0, 3, 8)


def test_decode_tp_twice_the_prefills_reads_a_sub_slice_of_one_worker():
    assert head_reads(1, 1, 2, 8) == [HeadRead(0, (4, 8), (0, 4), 2, False, True)]


def test_decode_tp_half_the_prefills_concatenates_two_workers():
    assert head_reads(0, 2, 1, 8) == [
        HeadRead(0, (0, 4), (0, 4), 1, True, False),
        HeadRead(1, (0, 4), (4, 8), 1, True, False),
    ]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), SIZES)
@pytest.mark.parametrize("total", [8, 4, 2, 1], ids=lambda k: f"{k}-heads")
def test_every_decode_head_comes_from_a_prefill_worker_holding_it(prefill_tp, decode_tp, total):
    if (total % prefill_tp and prefill_tp % total) or (total % decode_tp and decode_tp % total):
        pytest.skip("no vLLM split")
    readers: dict[int, set[int]] = {}
    for rank in range(decode_tp):
        ours = rank_heads(rank, decode_tp, total)
        filled = []
        for read in head_reads(rank, prefill_tp, decode_tp, total):
            theirs = rank_heads(read.prefill_rank, prefill_tp, total)
            assert [theirs[h] for h in range(*read.src)] == [ours[h] for h in range(*read.dst)]
            filled += range(*read.dst)
            readers.setdefault(read.prefill_rank, set()).add(rank)
            assert read.num_consumers == len(
                consumers(read.prefill_rank, prefill_tp, decode_tp, total)
            )
        assert filled == list(range(len(ours)))  # each of our heads once, in order
    for prefill_rank, ranks in readers.items():
        assert len(ranks) == len(consumers(prefill_rank, prefill_tp, decode_tp, total))
    unread = [
        p
        for rank in range(decode_tp)
        for p in unread_ranks_released_by(rank, prefill_tp, decode_tp, total)
    ]
    # every prefill worker is read or released unread, exactly once
    assert sorted([*readers, *unread]) == list(range(prefill_tp))


def test_replicated_heads_spread_over_the_replicas():
    # 2 KV heads, prefill TP 4 (each head on two workers), decode TP 2: no worker read twice
    assert [head_reads(r, 4, 2, 2)[0].prefill_rank for r in range(2)] == [0, 2]
    assert unread_ranks_released_by(1, 4, 2, 2) == [1, 3]
    assert unread_ranks_released_by(0, 4, 2, 2) == []
    # 1 KV head, decode TP 2 over prefill TP 1: both read the one head, freed at the second
    assert head_reads(1, 1, 2, 1) == [HeadRead(0, (0, 1), (0, 1), 2, True, True)]


# ---- the fingerprint comparison ----------------------------------------------------------


def _share(tp: int, total: int = 8, **changes):
    heads = max(1, total // tp)
    fields = {"num_kv_heads": heads, "page_bytes": heads * 1024, "tensor_parallel_size": tp}
    return make_fingerprint(**{**fields, "total_num_kv_heads": total, **changes})


def test_unequal_tp_sizes_agree_when_the_models_kv_does():
    assert _share(1).tp_differences(_share(2)) == []
    assert _share(4, total=2).tp_differences(_share(1, total=2)) == []


@pytest.mark.parametrize(
    ("theirs", "named"),
    [
        (_share(2, total=4), "total_num_kv_heads: 4 != 8"),
        (_share(2, num_kv_heads=3, page_bytes=3 * 1024), "3 KV heads per worker"),
        (_share(2, dtype="bfloat16"), "dtype: 'bfloat16' != 'float32'"),
        (_share(2, num_layers=3), "num_layers"),
        (_share(2, head_size=32), "head_size"),
        (_share(2, block_size=64), "block_size"),
        (_share(2, model="other"), "model"),
        (_share(2, page_bytes=4 * 2048), "bytes of one head of one block: 2048 != 1024"),
        (_share(2, total_num_kv_heads=0), "total_num_kv_heads: not stated"),
        (_share(3, total=8), "8 KV heads do not split over tensor-parallel size 3"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_anything_else_that_differs_is_named(theirs, named):
    problems = theirs.tp_differences(_share(1))
    assert any(named in problem for problem in problems), problems


def test_a_layout_without_head_runs_refuses_unequal_tp_only():
    ours, theirs = _share(1, layout="LHBNC"), _share(2, layout="LHBNC")
    assert "layout: 'LHBNC' keeps a head's bytes" in " ".join(theirs.tp_differences(ours))
    assert _share(2, layout="LHBNC").tp_differences(theirs) == []


def test_equal_tp_sizes_accept_an_older_peer_that_does_not_state_the_total():
    old = msgspec.structs.replace(_share(2), total_num_kv_heads=0)
    assert old.tp_differences(_share(2)) == []


def test_the_stored_fingerprint_is_byte_for_byte_the_one_before_the_total():
    """The disk tier keys its folder and file headers on `for_storage()`: an instance of this
    version finds the disk tier an earlier one wrote (its fingerprint had no total)."""
    before = msgspec.json.encode(msgspec.structs.replace(_share(2), total_num_kv_heads=0))
    assert b"total_num_kv_heads" not in before
    assert msgspec.json.encode(_share(2).for_storage()) == before
    assert b'"total_num_kv_heads":8' in msgspec.json.encode(_share(2))  # P/D params carry it


def test_the_scheduler_finds_on_disk_what_a_worker_of_its_instance_wrote(tmp_path):
    """Both halves key the disk tier on the same fingerprint (for_storage() inside
    disk_tier_folder and DiskBlockStore): before, the worker wrote under the stored one and the
    scheduler's start-up scan looked in the full one's folder, and found nothing on restart."""
    fingerprint = _share(1, total=2)
    block_bytes = fingerprint.num_layers * fingerprint.page_bytes
    config = LLMDConnectorConfig(
        host_offload_bytes=4 * block_bytes,
        disk_offload_path=str(tmp_path),
        disk_offload_bytes=8 * block_bytes,
    )
    # the worker half's store (worker_tiers.make_offload_worker builds it so)
    worker_store = DiskBlockStore(
        disk_tier_folder(config.disk_offload_path, fingerprint), fingerprint, 0, block_bytes
    )
    keys = [bytes([k]) * 32 for k in range(3)]
    for key in keys:
        worker_store.write(key, torch.full((block_bytes,), 7, dtype=torch.uint8))
    # an earlier version's instance (no total in its fingerprint) keys the same folder
    older = msgspec.structs.replace(fingerprint, total_num_kv_heads=0)
    assert disk_tier_folder(tmp_path, older) == worker_store.root
    planner = make_offload_planner(config, fingerprint, publish_events=False)
    assert planner is not None
    assert planner.manager.num_on_disk() == len(keys)
    assert planner.manager.lookup(keys) == (0, len(keys))
    planner.close()


# ---- the decode's scheduler half ---------------------------------------------------------

PROMPT = list(range(3 * BLOCK + 5))


def _params_of_prefill(tp: int, ports: list[int] | None = None) -> dict:
    fingerprint = msgspec.to_builtins(_share(tp, total=2))
    return remote_prefill_params(
        PROMPT, llmd_fingerprint=fingerprint, llmd_ports=ports or [5701 + r for r in range(tp)]
    )


@pytest.mark.parametrize("prefill_tp", [1, 2, 4])
def test_a_prefill_of_any_tp_size_is_pulled_from(prefill_tp):
    """A decode of TP 2 pulls from a prefill of TP 1, 2 or 4 (of the same model's 2 KV heads:
    TP 4 replicates each head on two prefill workers)."""
    scheduler = make_scheduler(config=LLMDConnectorConfig(), consumer=True)
    scheduler.fingerprint = scheduler.remote.fingerprint = _share(2, total=2)
    request = make_request(
        "req-d", PROMPT, _params_of_prefill(prefill_tp), max_tokens=1, block_size=None
    )
    assert scheduler.get_num_new_matched_tokens(request, 0) == (len(PROMPT), True)


def test_ports_that_do_not_match_the_prefills_tp_size_are_refused():
    scheduler = make_scheduler(config=LLMDConnectorConfig(), consumer=True)
    scheduler.fingerprint = scheduler.remote.fingerprint = _share(2, total=2)
    params = _params_of_prefill(2, ports=[5701, 5702, 5703])
    request = make_request("req-d", PROMPT, params, max_tokens=1, block_size=None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)


# ---- whole instances over loopback -------------------------------------------------------

LAYERS, BLOCKS, TOKENS, CONTENT = 2, 10, 32, 8


def _model_kv(total: int) -> torch.Tensor:
    """One model-wide KV cache: [layer, block, head, token, content] float32."""
    generator = torch.Generator().manual_seed(total)
    return torch.randn(LAYERS, BLOCKS, total, TOKENS, CONTENT, generator=generator)


class Instance:
    """The workers of one instance: each a cache holding its rank's heads of the model KV."""

    def __init__(self, tp: int, total: int, model_kv: torch.Tensor | None) -> None:
        self.tp, heads = tp, max(1, total // tp)
        self.fingerprint = make_fingerprint(
            num_layers=LAYERS,
            num_kv_heads=heads,
            block_size=TOKENS,
            page_bytes=heads * TOKENS * CONTENT * 4,
            tensor_parallel_size=tp,
            total_num_kv_heads=total,
        )
        self.caches, self.servers, self.registries = [], [], []
        for rank in range(tp):
            held = rank_heads(rank, tp, total)
            if model_kv is None:  # a decode instance: garbage until pulled
                kv = torch.full((LAYERS, BLOCKS, heads, TOKENS, CONTENT), float("nan"))
            else:
                kv = model_kv[:, :, held.start : held.stop].clone()
            self.caches.append(kv)

    def layers(self, rank: int) -> dict[str, torch.Tensor]:
        return {f"layers.{layer}": self.caches[rank][layer] for layer in range(LAYERS)}

    def serve(self) -> list[int]:
        for rank in range(self.tp):
            paged = PagedKVCache.from_layers(self.layers(rank))

            def gather(block_ids, out, paged=paged):
                out = (
                    torch.empty(paged.buffer_bytes(len(block_ids)), dtype=torch.uint8)
                    if out is None
                    else out
                )
                gather_blocks(paged, block_ids, out)
                return out

            registry = SendRegistry(lease_s=30)
            self.registries.append(registry)
            self.servers.append(
                TransferServer(
                    "127.0.0.1",
                    0,
                    registry,
                    gather,
                    self.fingerprint,
                    paged.block_bytes,
                    same_host_shm=rank % 2 == 0,  # both transports
                    head_slicer=HeadSlicer(paged, self.fingerprint),
                )
            )
        return [server.port for server in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [*SIZES, (4, 4)])
@pytest.mark.parametrize("total", [8, 2], ids=lambda k: f"{k}-heads")
def test_decode_workers_pull_their_heads_byte_exact(prefill_tp, decode_tp, total):
    model_kv = _model_kv(total)
    prefill, decode = Instance(prefill_tp, total, model_kv), Instance(decode_tp, total, None)
    remote, local = (7, 2, 9, 0), (1, 8, 3, 5)
    try:
        ports = prefill.serve()
        for registry in prefill.registries:
            registry.add("req-p", "tid", list(remote))
        recv = RecvSpec(
            "req-d",
            "127.0.0.1",
            tuple(ports),
            "tid",
            prefill.fingerprint,
            remote,
            local,
            4 * TOKENS,
        )
        config = LLMDConnectorConfig(transfer_timeout_s=5.0, max_chunk_bytes=3 * 4096)
        errors: list[BaseException] = []

        def pull(rank: int) -> None:
            paged = PagedKVCache.from_layers(decode.layers(rank))
            puller = KVPuller(
                config, decode.fingerprint, rank, paged, HeadSlicer(paged, decode.fingerprint), None
            )
            try:
                puller.pull(recv)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=pull, args=(rank,)) for rank in range(decode_tp)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        for rank in range(decode_tp):  # plain indexing of the model-wide KV
            held = rank_heads(rank, decode_tp, total)
            wanted = model_kv[:, list(remote), held.start : held.stop]
            assert torch.equal(decode.caches[rank][:, list(local)], wanted)
        for registry in prefill.registries:  # every prefill worker released, none left waiting
            [send] = registry.take_finished()
            assert send.outcome == SendOutcome.DONE
    finally:
        prefill.close()
