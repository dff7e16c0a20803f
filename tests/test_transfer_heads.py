"""Head-sliced reads (unequal TP sizes, issue 25) without vLLM: the copies against plain torch
indexing, a real TransferServer and pull_blocks over loopback moving head slices byte-exact,
the consumer count of a transfer read by several decode workers, and the refusals (a crafted
head range or consumer count, a peer without the transfer id, an old prefill) before any byte
moves."""

from __future__ import annotations

import re
import socket
import time

import msgspec
import pytest
import torch
from factories import make_fingerprint

from vllm_llmd.ops import PagedKVCache, gather_blocks
from vllm_llmd.ops.layouts import AllocatedKVCache, KVCacheShape, allocate_kv_caches
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks
from vllm_llmd.transfer.framing import HEADER, frame_header, recv_exactly
from vllm_llmd.transfer.head_slices import HeadSlicer, HeadSliceUnsupported
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry
from vllm_llmd.transfer.server import TransferServer

LAYERS, BLOCKS, HEADS, TOKENS, CONTENT = 2, 12, 4, 32, 16  # CONTENT: K and V of one head
SHAPE = KVCacheShape(LAYERS, BLOCKS, HEADS, TOKENS, CONTENT)
PAGE = HEADS * TOKENS * CONTENT * 4  # float32


def _fingerprint(layout: str = "LBHNC", heads: int = HEADS):
    page = heads * TOKENS * CONTENT * 4
    return make_fingerprint(
        num_layers=LAYERS, num_kv_heads=heads, block_size=TOKENS, layout=layout, page_bytes=page
    )


def _cache(layout: str = "LBHNC", heads: int = HEADS, offset: int = 0) -> AllocatedKVCache:
    shape = KVCacheShape(LAYERS, BLOCKS, heads, TOKENS, CONTENT)
    dtype = torch.uint8 if offset % 4 else torch.float32
    return allocate_kv_caches(layout, shape, dtype, offset_bytes=offset)


def _heads_bytes(cache: AllocatedKVCache, block: int, heads: tuple[int, int]) -> torch.Tensor:
    """Plain indexing: heads of one block of every layer, as bytes ([layer, head, token, c])."""
    pages = [cache.kv_caches[f"layers.{layer}"][block] for layer in range(LAYERS)]
    return torch.stack([page[heads[0] : heads[1]] for page in pages]).contiguous().view(torch.uint8)


# ---- the copies ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLHNC", "BLNHC"])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("heads", [(0, 4), (1, 3), (3, 4)])
def test_head_slices_equal_plain_indexing(layout, offset, heads):
    source, target = _cache(layout, offset=offset), _cache(layout, offset=offset)
    fingerprint = _fingerprint(layout)
    if offset % 4:  # a byte cache (odd offsets need one): one byte per element
        fingerprint = msgspec.structs.replace(fingerprint, page_bytes=PAGE // 4)
    slicer = HeadSlicer(PagedKVCache.from_layers(source.kv_caches), fingerprint)
    ids = [5, 1, 9]
    data = slicer.gather(ids, heads, None)
    expected = [_heads_bytes(source, block, heads) for block in ids]
    if layout.endswith("NHC"):  # rows are tokens: [layer, token, head, c]
        expected = [e.transpose(1, 2).contiguous() for e in expected]
    assert torch.equal(data, torch.cat([e.reshape(-1) for e in expected]))

    before = {name: t.clone() for name, t in target.kv_caches.items()}
    HeadSlicer(PagedKVCache.from_layers(target.kv_caches), fingerprint).scatter(
        [0, 11, 4], heads, data
    )
    for layer in range(LAYERS):
        name = f"layers.{layer}"
        wanted = before[name].clone()
        for src_block, dst_block in zip(ids, [0, 11, 4], strict=True):
            wanted[dst_block, heads[0] : heads[1]] = source.kv_caches[name][
                src_block, heads[0] : heads[1]
            ]
        # bytes: random float32 bytes hold NaNs, which torch.equal never calls equal
        assert torch.equal(target.kv_caches[name].view(torch.uint8), wanted.view(torch.uint8))


@pytest.mark.parametrize("layout", ["LHBNC", "BHLNC"])
def test_layouts_that_keep_a_heads_bytes_apart_are_refused(layout):
    cache = PagedKVCache.from_layers(_cache(layout).kv_caches)
    with pytest.raises(HeadSliceUnsupported, match="keeps a head's bytes apart"):
        HeadSlicer(cache, _fingerprint(layout))


# ---- a real side channel -------------------------------------------------------------------


class Prefill:
    """One prefill worker: a real cache, its HeadSlicer and a TransferServer over loopback."""

    def __init__(self, same_host_shm: bool, head_slices: bool = True, **options) -> None:
        self.cache = _cache()
        paged = PagedKVCache.from_layers(self.cache.kv_caches)
        self.slicer = HeadSlicer(paged, _fingerprint())
        self.gathers: list[tuple] = []

        def gather(block_ids, out):
            self.gathers.append(("blocks", list(block_ids)))
            out = (
                torch.empty(paged.buffer_bytes(len(block_ids)), dtype=torch.uint8)
                if out is None
                else out
            )
            gather_blocks(paged, block_ids, out)
            return out

        real_gather = self.slicer.gather

        def gather_heads(block_ids, heads, out):
            self.gathers.append(("heads", list(block_ids), heads))
            return real_gather(block_ids, heads, out)

        self.slicer.gather = gather_heads  # type: ignore[method-assign]
        self.registry = SendRegistry(lease_s=30)
        self.server = TransferServer(
            "127.0.0.1",
            0,
            self.registry,
            gather,
            _fingerprint(),
            paged.block_bytes,
            same_host_shm=same_host_shm,
            head_slicer=self.slicer if head_slices else None,
            **options,
        )
        self.endpoint = f"tcp://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.close()


@pytest.fixture(params=["shm", "socket"])
def prefill(request):
    worker = Prefill(same_host_shm=request.param == "shm")
    yield worker
    worker.close()


def _pull_heads(
    prefill: Prefill,
    target: AllocatedKVCache,
    remote_ids: list[int],
    local_ids: list[int],
    heads: tuple[int, int],
    dst: tuple[int, int],
    *,
    transfer_id: str = "tid",
    num_consumers: int = 1,
    read_bytes: int = 1 << 20,
) -> int:
    """Heads of prefill's remote blocks into dst heads of target's local blocks."""
    target_slicer = HeadSlicer(
        PagedKVCache.from_layers(target.kv_caches),
        _fingerprint(heads=target.kv_caches["layers.0"].shape[1]),
    )
    count = heads[1] - heads[0]

    def scatter(first: int, data: torch.Tensor) -> None:
        blocks = data.numel() // target_slicer.block_bytes(count)
        target_slicer.scatter(local_ids[first : first + blocks], dst, data)

    spec = PullSpec(
        prefill.endpoint,
        transfer_id,
        _fingerprint(),
        tuple(remote_ids),
        prefill.slicer.block_bytes(max(1, count)),  # a crafted range must reach the server
        heads=heads,
        num_consumers=num_consumers,
    )
    return pull_blocks(
        spec, scatter, timeout_s=2, unknown_transfer_grace_s=0.3, max_chunk_bytes=read_bytes
    )


def test_a_head_read_moves_exactly_those_heads_in_bounded_reads(prefill):
    target = _cache(heads=2)  # a decode worker of twice the TP size: 2 of the 4 heads
    remote, local = [9, 2, 11, 5, 7], [0, 1, 2, 3, 4]
    prefill.registry.add("req", "tid", remote)
    slice_bytes = prefill.slicer.block_bytes(2)
    nbytes = _pull_heads(prefill, target, remote, local, (2, 4), (0, 2), read_bytes=2 * slice_bytes)
    assert nbytes == len(remote) * slice_bytes == len(remote) * PAGE * LAYERS // 2
    for src, dst in zip(remote, local, strict=True):
        assert torch.equal(
            _heads_bytes(target, dst, (0, 2)), _heads_bytes(prefill.cache, src, (2, 4))
        )
    assert [g[0] for g in prefill.gathers] == ["heads"] * 3  # three reads of at most two blocks
    [send] = prefill.registry.take_finished()
    assert send.outcome == SendOutcome.DONE


def test_two_decode_workers_fill_one_block_from_two_prefill_workers():
    """Decode TP 1 from prefill TP 2: each prefill worker's whole heads land side by side."""
    halves = [Prefill(same_host_shm=False), Prefill(same_host_shm=False)]
    try:
        target = _cache(heads=2 * HEADS)
        for half, rank_heads in zip(halves, [(0, HEADS), (HEADS, 2 * HEADS)], strict=True):
            half.registry.add("req", "tid", [3, 4])
            _pull_heads(half, target, [3, 4], [6, 8], (0, HEADS), rank_heads)
        for src, dst in ((3, 6), (4, 8)):
            assert torch.equal(
                _heads_bytes(target, dst, (0, HEADS)),
                _heads_bytes(halves[0].cache, src, (0, HEADS)),
            )
            assert torch.equal(
                _heads_bytes(target, dst, (HEADS, 2 * HEADS)),
                _heads_bytes(halves[1].cache, src, (0, HEADS)),
            )
    finally:
        for half in halves:
            half.close()


def test_a_transfer_read_by_two_decode_workers_is_freed_at_the_second_release(prefill):
    prefill.registry.add("req", "tid", [1, 2])
    target = _cache(heads=2)
    _pull_heads(prefill, target, [1, 2], [1, 2], (0, 2), (0, 2), num_consumers=2)
    assert prefill.registry.take_finished() == []  # the other decode worker has not read yet
    _pull_heads(prefill, target, [1, 2], [1, 2], (2, 4), (0, 2), num_consumers=2)
    [send] = prefill.registry.take_finished()
    assert send.outcome == SendOutcome.DONE


def test_the_first_failure_of_several_consumers_is_the_outcome():
    registry = SendRegistry(lease_s=10)
    registry.add("req", "t", [1])
    assert registry.release("t", False, "decode rank 0 gave up", num_consumers=2)
    assert registry.take_finished() == []
    assert registry.release("t", True, num_consumers=2)
    [send] = registry.take_finished()
    assert (send.outcome, send.reason) == (SendOutcome.FAILED, "decode rank 0 gave up")


# ---- refusals before any byte moves --------------------------------------------------------


@pytest.mark.parametrize("heads", [(0, 5), (4, 5), (0, wire.MAX_HEADS)], ids=str)
def test_a_head_range_outside_the_workers_heads_is_refused_unpinned(prefill, heads):
    prefill.registry.add("req", "tid", [1, 2])
    with pytest.raises(TransferFailed, match=r"bad_request.*not within this worker's 4 heads"):
        _pull_heads(prefill, _cache(heads=2), [1, 2], [1, 2], heads, (0, 2))
    assert prefill.gathers == []
    [send] = prefill.registry.take_finished()  # not left pinned; the puller released it failed
    assert send.outcome == SendOutcome.FAILED


@pytest.mark.parametrize("heads", [(2, 2), (3, 1)], ids=str)
def test_an_empty_head_range_is_not_even_asked_for(prefill, heads):
    prefill.registry.add("req", "tid", [1, 2])
    with pytest.raises(TransferFailed, match=re.escape(f"heads {heads}")):
        _pull_heads(prefill, _cache(heads=2), [1, 2], [1, 2], heads, (0, 2))
    assert prefill.gathers == []
    [send] = prefill.registry.take_finished()
    assert send.outcome == SendOutcome.FAILED


def _ask_raw(server: TransferServer, message: dict) -> wire.Reply:
    """One request frame of arbitrary msgpack (no client-side checks), and its reply."""
    control = msgspec.msgpack.encode(message)
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        sock.sendall(frame_header(len(control)) + control)
        deadline = time.monotonic() + 3
        header = recv_exactly(sock, HEADER.size, deadline)
        return wire.decode_reply(recv_exactly(sock, HEADER.unpack(header)[2], deadline))


IPC_CACHE = wire.CudaIpcCache(
    device_uuid="u",
    storages=[],
    segment_storages=[],
    segment_offsets=[],
    num_blocks=1,
    page_bytes=1,
    block_stride=1,
)


def _read_heads(**changes) -> dict:
    message = {
        "type": "read_heads",
        "version": wire.PROTOCOL_VERSION,
        "transfer_id": "tid",
        "fingerprint": msgspec.to_builtins(_fingerprint()),
        "block_ids": [1],
        "head_start": 0,
        "head_end": 1,
    }
    return {**message, **changes}


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"head_start": -1}, "undecodable.*head_start"),
        ({"head_end": wire.MAX_HEADS + 1}, "undecodable.*head_end"),
        ({"head_end": "2"}, "undecodable.*head_end"),
        ({"ipc_cache": msgspec.to_builtins(IPC_CACHE)}, "CUDA IPC writes whole blocks"),
        ({"head_start": 2, "head_end": 2}, r"head range \[2, 2\) is not within"),
        ({"head_start": 3, "head_end": 1}, r"head range \[3, 1\) is not within"),
        ({"transfer_id": "not-the-id", "head_end": 9}, "unknown or finished"),
    ],
    ids=[
        "negative",
        "past-the-bound",
        "not-an-int",
        "with-cuda-ipc",
        "empty",
        "inverted",
        "without-the-transfer-id",
    ],
)
def test_crafted_head_reads_are_refused_before_a_gather(changes, refusal):
    prefill = Prefill(same_host_shm=False)
    try:
        prefill.registry.add("req", "tid", [1])
        reply = _ask_raw(prefill.server, _read_heads(**changes))
        assert isinstance(reply, wire.TransferError)
        assert reply.code in (wire.BAD_REQUEST, wire.UNKNOWN_TRANSFER)
        assert re.search(refusal, reply.message), reply.message
        if "transfer_id" in changes:  # nothing about this worker's heads without the id
            assert "heads" not in reply.message
        assert prefill.gathers == []
        assert len(prefill.registry) == 1 and prefill.registry.begin_read("tid", [1]) is None
    finally:
        prefill.close()


@pytest.mark.parametrize("count", [0, -1, wire.MAX_CONSUMERS + 1])
def test_a_crafted_consumer_count_is_refused_and_the_transfer_stays(count):
    prefill = Prefill(same_host_shm=False)
    try:
        prefill.registry.add("req", "tid", [1])
        release = {"type": "release", "version": wire.PROTOCOL_VERSION, "transfer_id": "tid"}
        reply = _ask_raw(prefill.server, {**release, "success": True, "num_consumers": count})
        assert isinstance(reply, wire.TransferError) and "num_consumers" in reply.message
        assert prefill.registry.take_finished() == [] and len(prefill.registry) == 1
    finally:
        prefill.close()


def test_a_prefill_serving_whole_blocks_only_refuses_head_reads():
    prefill = Prefill(same_host_shm=False, head_slices=False)
    try:
        prefill.registry.add("req", "tid", [1])
        with pytest.raises(TransferFailed, match="serves whole blocks only"):
            _pull_heads(prefill, _cache(heads=2), [1], [1], (0, 2), (0, 2))
        assert prefill.gathers == []
    finally:
        prefill.close()


def test_an_old_prefill_without_head_reads_gives_a_clear_error_not_whole_blocks(monkeypatch):
    # what a prefill of the version before head reads decodes: ReadHeads is an unknown tag
    old = msgspec.msgpack.Decoder(wire.ReadBlocks | wire.ReleaseTransfer)
    monkeypatch.setattr(wire, "_request_decoder", old)
    prefill = Prefill(same_host_shm=False)
    try:
        prefill.registry.add("req", "tid", [1])
        with pytest.raises(TransferFailed, match=r"without head-sliced reads.*prefill side too"):
            _pull_heads(prefill, _cache(heads=2), [1], [1], (0, 2), (0, 2))
        assert prefill.gathers == []
    finally:
        prefill.close()
