"""The same-host GPU→GPU path of the P/D side channel (transfer/cuda_ipc.py).

On this CPU machine, a fake stands in for the CUDA driver's four IPC calls only
(`cuda_driver.IpcDriver`: export, open and close a handle, an allocation's address range),
which need a GPU: `FakeDriver`'s allocations are CPU storages, a handle names one and opening it
gives its address. Everything else is real: the checks of every field a peer sends, the check
against the allocation's real size, the unowned storages over the mapping, the side channel,
the messages, the copies through `vllm_llmd.ops`, the registry's pins and the fallbacks. The
CUDA test at the end runs the real thing between two processes where a GPU is.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap

import msgspec
import pytest
import torch

from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.ops.layouts import KVCacheShape, allocate_kv_caches
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks
from vllm_llmd.transfer.cuda_driver import IpcDriver
from vllm_llmd.transfer.cuda_ipc import CudaIpcWriter, IpcUnavailable, export_cache
from vllm_llmd.transfer.registry import SendRegistry
from vllm_llmd.transfer.server import TransferServer

SHAPE = KVCacheShape(num_layers=3, num_blocks=12, num_heads=2, block_size=4, content=8)


class FakeDriver:
    """Stands in for cuMemGetAddressRange / cuIpcGetMemHandle / cuIpcOpenMemHandle /
    cuIpcCloseMemHandle (no GPU here). One process, so a handle opens to the allocation's own
    address; what matters is what it reports: each allocation's real size."""

    def __init__(self) -> None:
        self.allocations: dict[bytes, torch.UntypedStorage] = {}
        self.calls: list[tuple[str, object]] = []  # every argument we were given
        self.mapped: list[int] = []  # open mappings (an address per open)
        self.fail_open = False

    def track(self, cache: PagedKVCache) -> PagedKVCache:
        """Make cache's storages allocations this fake knows (cudaMalloc'd, on a GPU)."""
        for storage in cache.storages:
            if storage not in self.allocations.values():
                self.allocations[secrets.token_bytes(wire.CUDA_IPC_HANDLE_BYTES)] = storage
        return cache

    def export(self, cache: PagedKVCache) -> wire.CudaIpcCache:
        return export_cache(self.track(cache), driver=self)

    def allocation_range(self, ptr: int, device: torch.device) -> tuple[int, int]:
        self.calls.append(("allocation_range", ptr))
        for storage in self.allocations.values():
            if storage.data_ptr() <= ptr < storage.data_ptr() + storage.nbytes():
                return storage.data_ptr(), storage.nbytes()
        raise RuntimeError("CUDA_ERROR_NOT_FOUND (fake)")

    def export_handle(self, base: int, device: torch.device) -> bytes:
        self.calls.append(("export_handle", base))
        return next(h for h, s in self.allocations.items() if s.data_ptr() == base)

    def open_handle(self, handle: bytes, device: torch.device) -> int:
        self.calls.append(("open_handle", handle))
        if self.fail_open:
            raise RuntimeError("CUDA_ERROR_PEER_ACCESS_UNSUPPORTED (fake)")
        if handle not in self.allocations:
            raise RuntimeError("CUDA_ERROR_INVALID_VALUE (fake)")
        self.mapped.append(self.allocations[handle].data_ptr())
        return self.mapped[-1]

    def close_handle(self, ptr: int, device: torch.device) -> None:
        self.calls.append(("close_handle", ptr))
        self.mapped.remove(ptr)

    @property
    def opened(self) -> int:
        return sum(name == "open_handle" for name, _ in self.calls)


def _cache(seed: int, layout: str = "LBHNC", device: str = "cpu") -> PagedKVCache:
    generator = torch.Generator().manual_seed(seed)
    allocated = allocate_kv_caches(layout, SHAPE, torch.float32, generator=generator, device=device)
    return PagedKVCache.from_layers(allocated.kv_caches)


def _block(cache: PagedKVCache, block_id: int) -> torch.Tensor:
    out = torch.empty(cache.block_bytes, dtype=torch.uint8, device=cache.device)
    gather_blocks(cache, [block_id], out)
    return out.cpu()


def _fingerprint(cache: PagedKVCache) -> wire.KVLayoutFingerprint:
    return wire.KVLayoutFingerprint(
        model="m",
        dtype="float32",
        num_layers=SHAPE.num_layers,
        num_kv_heads=SHAPE.num_heads,
        head_size=SHAPE.content // 2,
        block_size=SHAPE.block_size,
        layout="LBHNC",
        tensor_parallel_size=1,
        page_bytes=cache.page_bytes,
    )


class SideChannel:
    """A prefill worker's real TransferServer over `prefill`; with `driver`, it writes into
    peers through CUDA IPC (faked on CPU, real on a GPU)."""

    def __init__(self, prefill: PagedKVCache, driver: IpcDriver | None) -> None:
        def gather(block_ids: list[int], out: torch.Tensor | None) -> torch.Tensor:
            if out is None:
                out = torch.empty(prefill.buffer_bytes(len(block_ids)), dtype=torch.uint8)
            gather_blocks(prefill, block_ids, out)
            if prefill.device.type == "cuda":
                torch.cuda.synchronize(prefill.device)
            return out

        self.registry = SendRegistry(lease_s=30)
        self.writer = CudaIpcWriter(prefill, driver=driver) if driver else None
        self.server = TransferServer(
            "127.0.0.1",
            0,
            self.registry,
            gather,
            _fingerprint(prefill),
            prefill.block_bytes,
            ipc_write=self.writer.write if self.writer else None,
        )
        self.endpoint = f"tcp://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.close()
        if self.writer is not None:
            self.writer.close()


def _pull(endpoint: str, decode: PagedKVCache, ipc_cache, remote, local, transfer_id):
    """pull_blocks as the decode worker runs it: (bytes received, local ids scattered here)."""
    scattered: list[int] = []

    def scatter(first: int, data: torch.Tensor) -> None:
        ids = list(local[first : first + data.numel() // decode.block_bytes])
        scattered.extend(ids)
        scatter_blocks(decode, ids, data)

    received = pull_blocks(
        PullSpec(
            endpoint=endpoint,
            transfer_id=transfer_id,
            fingerprint=_fingerprint(decode),
            remote_block_ids=tuple(remote),
            block_bytes=decode.block_bytes,
            ipc=ipc_cache,
            local_block_ids=tuple(local),
        ),
        scatter,
        timeout_s=5,
        unknown_transfer_grace_s=0.5,
        max_chunk_bytes=2 * decode.block_bytes,  # several chunks: ids split across reads
    )
    return received, scattered


def _pull_from(channel: SideChannel, decode, ipc_cache, remote, local, transfer_id):
    channel.registry.add("req-" + transfer_id, transfer_id, list(remote))
    return _pull(channel.endpoint, decode, ipc_cache, remote, local, transfer_id)


def _assert_released(channel: SideChannel, outcome: str, count: int = 1) -> None:
    """Every pulled transfer was released by the decode side (nothing left to the lease)."""
    finished = channel.registry.take_finished()
    assert len(finished) == count and len(channel.registry) == 0
    assert all(send.outcome.startswith(outcome) for send in finished), finished


@pytest.fixture
def fake():
    return FakeDriver()


def test_prefill_writes_the_blocks_into_the_decode_cache(fake):
    prefill, decode = _cache(1), _cache(2)
    channel = SideChannel(prefill, fake)
    try:
        remote, local = [7, 1, 4, 9, 0], [3, 11, 5, 6, 2]
        expected = [_block(prefill, b) for b in remote]
        untouched = _block(decode, 8)
        target = fake.export(decode)
        received, scattered = _pull_from(channel, decode, target, remote, local, "t-ipc")
        assert received == len(remote) * decode.block_bytes
        assert scattered == []  # nothing came back as bytes: the prefill wrote in place
        for block_id, want in zip(local, expected, strict=True):
            assert torch.equal(_block(decode, block_id), want)
        assert torch.equal(_block(decode, 8), untouched)
        assert channel.server.bytes_ipc == received and channel.server.bytes_sent == 0
        assert fake.opened == 1  # opened once, reused by the next chunks
        _assert_released(channel, "done")
    finally:
        channel.close()
    assert fake.mapped == []  # closed with the writer


def test_unopenable_handles_fall_back_to_bytes_and_are_not_sent_again(fake):
    prefill, decode = _cache(3), _cache(4)
    fake.fail_open = True
    channel = SideChannel(prefill, fake)
    try:
        target = fake.export(decode)
        remote, local = [2, 3, 4], [9, 10, 11]
        _, scattered = _pull_from(channel, decode, target, remote, local, "t-fallback")
        assert scattered == local and channel.server.bytes_ipc == 0 and fake.opened == 1
        for theirs, ours in zip(remote, local, strict=True):
            assert torch.equal(_block(decode, ours), _block(prefill, theirs))
        fake.fail_open = False  # would work now, but this endpoint is remembered
        _, scattered = _pull_from(channel, decode, target, [5], [1], "t-again")
        assert scattered == [1] and channel.server.bytes_ipc == 0 and fake.opened == 1
        _assert_released(channel, "done", count=2)
    finally:
        channel.close()


def test_a_prefill_without_the_path_answers_with_bytes(fake):
    prefill, decode = _cache(5), _cache(6)
    channel = SideChannel(prefill, None)
    try:
        target = fake.export(decode)
        _, scattered = _pull_from(channel, decode, target, [1, 2], [3, 4], "t-plain")
        assert scattered == [3, 4]
        assert torch.equal(_block(decode, 4), _block(prefill, 2))
    finally:
        channel.close()


def test_export_sends_the_handle_and_where_the_storage_lies_only(fake):
    decode = _cache(12)
    target = fake.export(decode)
    (storage,) = target.storages  # every layer of this layout is in one allocation
    allocation = decode.storages[0]
    assert storage.handle in fake.allocations and len(storage.handle) == 64
    assert (storage.offset_bytes, storage.size_bytes) == (0, allocation.nbytes())
    assert wire.CudaIpcStorage.__struct_fields__ == ("handle", "offset_bytes", "size_bytes")
    assert [name for name, _ in fake.calls] == ["allocation_range", "export_handle"]


def _lie(target: wire.CudaIpcCache, **changes) -> wire.CudaIpcCache:
    """target with some fields changed; `storage` changes apply to storages[0]."""
    storage = changes.pop("storage", {})
    storages = [msgspec.structs.replace(target.storages[0], **storage), *target.storages[1:]]
    return msgspec.structs.replace(target, storages=storages, **changes)


def test_a_description_that_overruns_its_storage_is_refused_before_any_write(fake):
    prefill, decode = _cache(7), _cache(8)
    channel = SideChannel(prefill, fake)
    try:
        target = fake.export(decode)
        lying = _lie(target, num_blocks=target.num_blocks * 4)  # past the end of its storage
        before = [_block(decode, b) for b in range(SHAPE.num_blocks)]
        with pytest.raises(TransferFailed, match=r"but storages\[0\] has"):
            _pull_from(channel, decode, lying, [1], [40], "t-lie")
        assert all(torch.equal(_block(decode, b), before[b]) for b in range(SHAPE.num_blocks))
        assert fake.opened == 0  # refused from the description alone
        _assert_released(channel, "failed")  # the decode side said so: freed at once
    finally:
        channel.close()


def test_a_storage_claimed_larger_than_its_allocation_is_refused_before_any_write(fake):
    """The peer claims a storage (and blocks) 4x its real allocation: consistent with itself,
    so only the allocation's real size, from the driver, can refuse it. torch's
    `_new_shared_cuda` built a storage of the claimed size, and the kernels wrote past the end."""
    prefill, decode = _cache(13), _cache(14)
    channel = SideChannel(prefill, fake)
    try:
        target = fake.export(decode)
        real = target.storages[0].size_bytes
        lying = _lie(target, num_blocks=target.num_blocks * 4, storage={"size_bytes": real * 4})
        before = [_block(decode, b) for b in range(SHAPE.num_blocks)]
        with pytest.raises(TransferFailed, match=f"allocation behind its handle has {real} bytes"):
            _pull_from(channel, decode, lying, [1], [40], "t-big")
        assert all(torch.equal(_block(decode, b), before[b]) for b in range(SHAPE.num_blocks))
        assert fake.opened == 1 and fake.mapped == []  # opened to learn its size, closed again
        _assert_released(channel, "failed")
        # an honest description still works after it
        _pull_from(channel, decode, target, [2], [3], "t-honest")
        assert torch.equal(_block(decode, 3), _block(prefill, 2))
    finally:
        channel.close()
    assert fake.mapped == []


_HUGE = 2**63  # past int64: once summed into an address, any offset would wrap


@pytest.mark.parametrize(
    ("changes", "ids", "field"),
    [
        ({"storage": {"offset_bytes": -512}}, [3], r"storages\[0\]\.offset_bytes = -512"),
        ({"storage": {"offset_bytes": _HUGE}}, [3], r"storages\[0\]\.offset_bytes"),
        ({"storage": {"offset_bytes": 4096}}, [3], "allocation behind its handle"),
        ({"storage": {"offset_bytes": 6}}, [3], "not a multiple of 4 bytes"),
        ({"storage": {"size_bytes": 2**64 - 1}}, [3], r"storages\[0\]\.size_bytes"),
        ({"storage": {"size_bytes": 0}}, [3], r"storages\[0\]\.size_bytes = 0"),
        ({"storage": {"handle": b"h" * 63}}, [3], r"handle: .* 64 bytes, got 63"),
        ({"storage": {"handle": b"h" * 65}}, [3], r"handle: .* 64 bytes, got 65"),
        ({"segment_offsets": [-4, 0, 0]}, [3], r"segment_offsets\[0\] = -4"),
        ({"segment_offsets": [_HUGE, 0, 0]}, [3], r"segment_offsets\[0\]"),
        ({"segment_offsets": [0, 0]}, [3], "segment_offsets: 2 entries"),
        ({"segment_storages": [0, 1, 0]}, [3], r"segment_storages\[1\] = 1"),
        ({"segment_storages": [0, -1, 0]}, [3], r"segment_storages\[1\] = -1"),
        ({"num_blocks": 0}, [3], "num_blocks = 0"),
        ({"num_blocks": _HUGE}, [3], "num_blocks"),
        ({"num_blocks": True}, [3], "num_blocks must be an integer"),
        ({"page_bytes": -1}, [3], "page_bytes = -1"),
        ({"device_uuid": "x" * 1000}, [3], "device_uuid"),
        ({}, [-1], r"ipc_block_ids\[0\] = -1"),
        ({}, [SHAPE.num_blocks], r"ipc_block_ids\[0\] = 12 is outside 0..11"),
        ({}, [_HUGE], r"ipc_block_ids\[0\]"),
    ],
)
def test_every_field_is_checked_before_anything_is_opened(fake, changes, ids, field):
    """Signs, bounds (no sum of them can wrap), alignment, lengths: each refusal names the
    field. Only the real-size check comes after opening (and closes what it opened)."""
    prefill, decode = _cache(15), _cache(16)
    writer = CudaIpcWriter(prefill, driver=fake)
    lying = _lie(fake.export(decode), **changes)
    before = [_block(decode, b) for b in range(SHAPE.num_blocks)]
    with pytest.raises(ValueError, match=field):
        writer.write([1], lying, ids)
    assert all(torch.equal(_block(decode, b), before[b]) for b in range(SHAPE.num_blocks))
    assert fake.opened == (1 if "allocation" in field else 0) and fake.mapped == []
    # what the wire does with it: msgpack carries each such value and decoding keeps it as
    # sent (so the checks above are what refuse it), but for a type msgspec refuses itself
    request = wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id="t",
        fingerprint=_fingerprint(decode),
        block_ids=[1],
        ipc_cache=lying,
        ipc_block_ids=ids,
    )
    if "must be an integer" in field:
        with pytest.raises(wire.WireError, match="Expected `int`, got `bool`"):
            wire.decode_request(wire.encode(request))
    else:
        assert wire.decode_request(wire.encode(request)) == request


def test_a_description_with_a_ref_counter_never_reaches_anything(fake, monkeypatch, tmp_path):
    """torch's IPC format names a ref-counter shm file and an offset in it, which torch's
    `_new_shared_cuda` (the old open) took as sent: a peer chose which counter it decremented.
    Now the description cannot carry one (decoding refuses it, naming the field), and the open
    path never calls torch's ref-counted open, nor gives the driver anything but the handle."""
    counter = tmp_path / "torch_ref_counter"  # stands for /dev/shm/torch_<pid>_<n>
    counter.write_bytes((7).to_bytes(8, "little") * 4)
    shared_cuda_calls = []  # torch's open cannot run without a GPU: record calls instead
    monkeypatch.setattr(
        torch.UntypedStorage,
        "_new_shared_cuda",
        lambda *args: shared_cuda_calls.append(args),
        raising=False,
    )
    prefill, decode = _cache(17), _cache(18)
    target = fake.export(decode)
    request = wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id="t",
        fingerprint=_fingerprint(decode),
        block_ids=[1],
        ipc_cache=target,
        ipc_block_ids=[2],
    )
    as_sent = msgspec.msgpack.decode(wire.encode(request))
    as_sent["ipc_cache"]["storages"][0].update(
        ref_counter_handle=str(counter).encode(),
        ref_counter_offset=16,
        event_handle=b"",
        event_sync_required=False,
    )
    with pytest.raises(wire.WireError, match="ref_counter_handle"):
        wire.decode_request(msgspec.msgpack.encode(as_sent))
    # the format it can be sent in: a real write, through the real side channel
    channel = SideChannel(prefill, fake)
    try:
        _pull_from(channel, decode, target, [1, 4], [2, 5], "t-counter")
        assert torch.equal(_block(decode, 5), _block(prefill, 4))
    finally:
        channel.close()
    assert shared_cuda_calls == []
    assert counter.read_bytes() == (7).to_bytes(8, "little") * 4
    handles = {storage.handle for storage in target.storages}
    pointers = {storage.data_ptr() for storage in decode.storages}
    for name, argument in fake.calls:
        assert argument in (handles if name == "open_handle" else pointers), (name, argument)


def test_mappings_are_opened_once_and_closed_when_their_last_peer_is_dropped(fake):
    prefill, first, second = _cache(19), _cache(20), _cache(21)
    writer = CudaIpcWriter(prefill, driver=fake, max_peers=1)
    first_target = fake.export(first)
    writer.write([1], first_target, [2])
    # same allocation, fewer blocks: another peer entry, the same mapping
    writer.write([1], msgspec.structs.replace(first_target, num_blocks=4), [3])
    assert fake.opened == 1 and len(fake.mapped) == 1
    writer.write([4], fake.export(second), [5])  # evicts both entries of the first
    assert fake.opened == 2 and fake.mapped == [second.storages[0].data_ptr()]
    assert torch.equal(_block(second, 5), _block(prefill, 4))
    writer.close()
    assert fake.mapped == []


def test_writer_checks_the_peer_layout_and_ids(fake):
    prefill = _cache(9)
    other_layout = _cache(10, layout="BLHNC")  # one segment per block, not per layer
    writer = CudaIpcWriter(prefill, driver=fake)
    with pytest.raises(ValueError, match="pages"):
        writer.write([1], fake.export(other_layout), [1])
    decode = _cache(11)
    target = fake.export(decode)
    with pytest.raises(ValueError, match="2 blocks to write but 1 targets"):
        writer.write([1, 2], target, [3])
    with pytest.raises(ValueError, match="repeat"):
        writer.write([1, 2], target, [3, 3])
    with pytest.raises(ValueError, match="out of range"):
        writer.write([SHAPE.num_blocks], target, [3])  # our own ids: checked by the gather
    with pytest.raises(IpcUnavailable, match="not CUDA"):
        export_cache(decode)  # the real export needs a CUDA cache
    assert fake.opened == 1 and len(fake.mapped) == 1  # only the last one got to opening
    writer.close()
    assert fake.mapped == []


def test_the_real_driver_refuses_a_handle_it_cannot_open_as_unavailable(fake):
    """No fake: here the CUDA driver is missing (CPU) or the handle names nothing (a GPU);
    either way the writer says IpcUnavailable (the server answers ipc_unavailable)."""
    writer = CudaIpcWriter(_cache(22))
    with pytest.raises(IpcUnavailable):
        writer.write([1], fake.export(_cache(23)), [2])
    writer.close()


# ---- the real thing, between two processes (a GPU machine) -----------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_PREFILL_PROCESS = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_cuda_ipc import REMOTE, SideChannel, _cache
    from vllm_llmd.transfer.cuda_ipc import cuda_driver
    channel = SideChannel(_cache(1, device="cuda"), cuda_driver())
    channel.registry.add("req", "t-cuda", REMOTE)
    channel.registry.add("req-big", "t-big", REMOTE[:1])
    print(channel.endpoint, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server = channel.server
    print(server.bytes_ipc, server.bytes_sent, server.bytes_shared, len(channel.registry))
    channel.close()
    """
)
REMOTE, LOCAL = [7, 1, 4, 9, 0], [3, 11, 5, 6, 2]


@needs_cuda
def test_cuda_ipc_between_two_processes():
    """A prefill process writes into this process's CUDA cache through real CUDA IPC handles
    (cudaIpcOpenMemHandle refuses handles from its own process: it takes two)."""
    decode = _cache(2, device="cuda")
    expected = [_block(_cache(1, device="cuda"), b) for b in REMOTE]
    prefill = subprocess.Popen(
        [sys.executable, "-c", _PREFILL_PROCESS, os.path.dirname(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = prefill.stdout.readline().strip()
        assert endpoint.startswith("tcp://"), endpoint
        target = export_cache(decode)
        received, scattered = _pull(endpoint, decode, target, REMOTE, LOCAL, "t-cuda")
        torch.cuda.synchronize()
        assert scattered == [] and received == len(REMOTE) * decode.block_bytes
        for block_id, want in zip(LOCAL, expected, strict=True):
            assert torch.equal(_block(decode, block_id), want)
        # a claim of 1 TiB, consistent with itself: only the real allocation's size refuses it
        before = [_block(decode, b) for b in range(SHAPE.num_blocks)]
        claim = 1 << 40
        lying = _lie(
            target,
            num_blocks=(claim - max(target.segment_offsets)) // target.block_stride,
            storage={"size_bytes": claim},
        )
        with pytest.raises(TransferFailed, match="allocation behind its handle has"):
            _pull(endpoint, decode, lying, REMOTE[:1], LOCAL[:1], "t-big")
        torch.cuda.synchronize()
        assert all(torch.equal(_block(decode, b), before[b]) for b in range(SHAPE.num_blocks))
        out, _ = prefill.communicate("", timeout=60)
        bytes_ipc, bytes_sent, bytes_shared, held = map(int, out.split())
        assert (bytes_ipc, bytes_sent, bytes_shared, held) == (received, 0, 0, 0)
    finally:
        if prefill.poll() is None:
            prefill.kill()
            prefill.wait()


@needs_cuda
def test_cuda_driver_reports_the_allocation_and_exports_its_handle():
    """The driver layer the CPU tests fake, against the real driver (one process: cannot open)."""
    from vllm_llmd.transfer.cuda_ipc import cuda_driver

    driver, device = cuda_driver(), torch.device("cuda", torch.cuda.current_device())
    tensor = torch.empty(3 << 20, dtype=torch.uint8, device=device)
    ptr = tensor.data_ptr()
    base, size = driver.allocation_range(ptr, device)
    assert base <= ptr and ptr + tensor.numel() <= base + size
    handle = driver.export_handle(base, device)
    assert len(handle) == wire.CUDA_IPC_HANDLE_BYTES and handle != bytes(len(handle))
    with pytest.raises(RuntimeError, match="cuIpcOpenMemHandle"):  # its own process's handle
        driver.open_handle(handle, device)
