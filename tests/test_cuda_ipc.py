"""The same-host GPU→GPU path of the P/D side channel (transfer/cuda_ipc.py).

On this CPU machine, a fake stands in for the two CUDA calls only (torch's IPC export and open
of an allocation cannot run without a GPU): `FakeIpc.share` names a CPU storage by a random
handle and `FakeIpc.open` maps it back. Everything else is real: the ZMQ side channel, the
messages, the writer's checks, the copies through `vllm_llmd.ops`, the registry's pins and the
fallbacks. The CUDA tests at the end run the real thing between two processes where a GPU is.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.ops.layouts import KVCacheShape, allocate_kv_caches
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks
from vllm_llmd.transfer.cuda_ipc import (
    CudaIpcWriter,
    IpcUnavailable,
    OpenFn,
    export_cache,
)
from vllm_llmd.transfer.registry import SendRegistry
from vllm_llmd.transfer.server import TransferServer

SHAPE = KVCacheShape(num_layers=3, num_blocks=12, num_heads=2, block_size=4, content=8)


class FakeIpc:
    """Stands in for cudaIpcGetMemHandle / cudaIpcOpenMemHandle (no GPU here)."""

    def __init__(self) -> None:
        self.exported: dict[bytes, torch.UntypedStorage] = {}
        self.opened = 0
        self.fail_open = False

    def share(self, storage: torch.UntypedStorage) -> wire.CudaIpcStorage:
        handle = secrets.token_bytes(64)
        self.exported[handle] = storage
        return wire.CudaIpcStorage(
            handle=handle,
            size_bytes=storage.nbytes(),
            offset_bytes=0,
            ref_counter_handle=b"",
            ref_counter_offset=0,
            event_handle=b"",
            event_sync_required=False,
        )

    def open(self, shared: wire.CudaIpcStorage, device: torch.device) -> torch.UntypedStorage:
        if self.fail_open:
            raise RuntimeError("cudaErrorPeerAccessUnsupported (fake)")
        self.opened += 1
        return self.exported[shared.handle]


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
    """A prefill worker's real TransferServer over `prefill`; with `open_storage`, it writes
    into peers through CUDA IPC (faked on CPU, real on a GPU)."""

    def __init__(self, prefill: PagedKVCache, open_storage: OpenFn | None) -> None:
        def gather(block_ids: list[int], out: torch.Tensor | None) -> torch.Tensor:
            if out is None:
                out = torch.empty(prefill.buffer_bytes(len(block_ids)), dtype=torch.uint8)
            gather_blocks(prefill, block_ids, out)
            if prefill.device.type == "cuda":
                torch.cuda.synchronize(prefill.device)
            return out

        self.registry = SendRegistry(lease_s=30)
        self.writer = CudaIpcWriter(prefill, open_storage=open_storage) if open_storage else None
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
def fake_ipc():
    return FakeIpc()


def test_prefill_writes_the_blocks_into_the_decode_cache(fake_ipc):
    prefill, decode = _cache(1), _cache(2)
    channel = SideChannel(prefill, fake_ipc.open)
    try:
        remote, local = [7, 1, 4, 9, 0], [3, 11, 5, 6, 2]
        expected = [_block(prefill, b) for b in remote]
        untouched = _block(decode, 8)
        target = export_cache(decode, share=fake_ipc.share)
        received, scattered = _pull_from(channel, decode, target, remote, local, "t-ipc")
        assert received == len(remote) * decode.block_bytes
        assert scattered == []  # nothing came back as bytes: the prefill wrote in place
        for block_id, want in zip(local, expected, strict=True):
            assert torch.equal(_block(decode, block_id), want)
        assert torch.equal(_block(decode, 8), untouched)
        assert channel.server.bytes_ipc == received and channel.server.bytes_sent == 0
        assert fake_ipc.opened == 1  # opened once, reused by the next chunks
        _assert_released(channel, "done")
    finally:
        channel.close()


def test_unopenable_handles_fall_back_to_bytes_and_are_not_sent_again(fake_ipc):
    prefill, decode = _cache(3), _cache(4)
    fake_ipc.fail_open = True
    channel = SideChannel(prefill, fake_ipc.open)
    try:
        target = export_cache(decode, share=fake_ipc.share)
        remote, local = [2, 3, 4], [9, 10, 11]
        _, scattered = _pull_from(channel, decode, target, remote, local, "t-fallback")
        assert scattered == local and channel.server.bytes_ipc == 0
        for theirs, ours in zip(remote, local, strict=True):
            assert torch.equal(_block(decode, ours), _block(prefill, theirs))
        fake_ipc.fail_open = False  # would work now, but this endpoint is remembered
        _, scattered = _pull_from(channel, decode, target, [5], [1], "t-again")
        assert scattered == [1] and channel.server.bytes_ipc == 0 and fake_ipc.opened == 0
        _assert_released(channel, "done", count=2)
    finally:
        channel.close()


def test_a_prefill_without_the_path_answers_with_bytes(fake_ipc):
    prefill, decode = _cache(5), _cache(6)
    channel = SideChannel(prefill, None)
    try:
        target = export_cache(decode, share=fake_ipc.share)
        _, scattered = _pull_from(channel, decode, target, [1, 2], [3, 4], "t-plain")
        assert scattered == [3, 4]
        assert torch.equal(_block(decode, 4), _block(prefill, 2))
    finally:
        channel.close()


def test_a_description_that_overruns_its_storage_is_refused_before_any_write(fake_ipc):
    prefill, decode = _cache(7), _cache(8)
    channel = SideChannel(prefill, fake_ipc.open)
    try:
        target = export_cache(decode, share=fake_ipc.share)
        lying = wire.CudaIpcCache(
            device_uuid="",
            storages=target.storages,
            segment_storages=target.segment_storages,
            segment_offsets=target.segment_offsets,
            num_blocks=target.num_blocks * 4,  # blocks past the end of its memory
            page_bytes=target.page_bytes,
            block_stride=target.block_stride,
        )
        before = [_block(decode, b) for b in range(SHAPE.num_blocks)]
        with pytest.raises(TransferFailed, match="storage has"):
            _pull_from(channel, decode, lying, [1], [40], "t-lie")
        assert all(torch.equal(_block(decode, b), before[b]) for b in range(SHAPE.num_blocks))
        _assert_released(channel, "failed")  # the decode side said so: freed at once
    finally:
        channel.close()


def test_writer_checks_the_peer_layout_and_ids(fake_ipc):
    prefill = _cache(9)
    other_layout = _cache(10, layout="BLHNC")  # one segment per block, not per layer
    writer = CudaIpcWriter(prefill, open_storage=fake_ipc.open)
    with pytest.raises(ValueError, match="pages"):
        writer.write([1], export_cache(other_layout, share=fake_ipc.share), [1])
    decode = _cache(11)
    target = export_cache(decode, share=fake_ipc.share)
    with pytest.raises(ValueError, match="2 blocks to write but 1 targets"):
        writer.write([1, 2], target, [3])
    with pytest.raises(ValueError, match="out of range"):
        writer.write([1], target, [SHAPE.num_blocks])
    with pytest.raises(IpcUnavailable, match="not CUDA"):
        export_cache(decode)  # the real export needs a CUDA cache


# ---- the real thing, between two processes (a GPU machine) -----------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_PREFILL_PROCESS = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_cuda_ipc import REMOTE, SideChannel, _cache, open_cuda_storage
    channel = SideChannel(_cache(1, device="cuda"), open_cuda_storage)
    channel.registry.add("req", "t-cuda", REMOTE)
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
        out, _ = prefill.communicate("", timeout=60)
        bytes_ipc, bytes_sent, bytes_shared, held = map(int, out.split())
        assert (bytes_ipc, bytes_sent, bytes_shared, held) == (received, 0, 0, 0)
    finally:
        if prefill.poll() is None:
            prefill.kill()
            prefill.wait()
