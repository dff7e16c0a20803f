"""The same-host GPU→GPU path of the P/D side channel (transfer/cuda_ipc.py): the prefill
writes straight into the decode cache, unopenable handles and prefills without the path fall
back to bytes, mappings are opened once and closed with their last peer.

On this CPU machine a fake stands in for the CUDA driver's four IPC calls only
(`cuda_ipc_harness.FakeDriver`); the side channel, the messages, the copies through
`vllm_llmd.ops`, the registry's pins and the fallbacks are real. The CUDA tests at the end run
the real thing between two processes where a GPU is. What a peer's description may claim is
checked in test_cuda_ipc_checks.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import msgspec
import pytest
import torch
from cuda_ipc_harness import (
    SHAPE,
    FakeDriver,
    SideChannel,
    assert_released,
    block_of,
    lie,
    make_cache,
    pull,
    pull_from,
)

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import TransferFailed
from vllm_llmd.transfer.cuda_ipc import CudaIpcWriter, IpcUnavailable, export_cache
from vllm_llmd.transfer.registry import SendOutcome


@pytest.fixture
def fake():
    return FakeDriver()


def test_prefill_writes_the_blocks_into_the_decode_cache(fake):
    prefill, decode = make_cache(1), make_cache(2)
    channel = SideChannel(prefill, fake)
    try:
        remote, local = [7, 1, 4, 9, 0], [3, 11, 5, 6, 2]
        expected = [block_of(prefill, b) for b in remote]
        untouched = block_of(decode, 8)
        target = fake.export(decode)
        received, scattered = pull_from(channel, decode, target, remote, local, "t-ipc")
        assert received == len(remote) * decode.block_bytes
        assert scattered == []  # nothing came back as bytes: the prefill wrote in place
        for block_id, want in zip(local, expected, strict=True):
            assert torch.equal(block_of(decode, block_id), want)
        assert torch.equal(block_of(decode, 8), untouched)
        assert channel.server.bytes_ipc == received and channel.server.bytes_sent == 0
        assert fake.opened == 1  # opened once, reused by the next reads
        assert_released(channel, SendOutcome.DONE)
    finally:
        channel.close()
    assert fake.mapped == []  # closed with the writer


def recorded_writes(channel: SideChannel) -> list[int]:
    """Block counts of each CUDA IPC write the prefill side runs from now on."""
    writes: list[int] = []
    write = channel.writer.write

    def recording(block_ids, target, target_ids):
        writes.append(len(block_ids))
        write(block_ids, target, target_ids)

    channel.server._ipc_write = recording
    return writes


def test_a_pull_written_in_place_takes_one_read_whatever_max_chunk_bytes(fake):
    """Byte reads stay within max_chunk_bytes (a buffer on each side); a read written in place
    moves no bytes and needs no buffer (page to page), so all blocks go in one read: each read
    costs a round trip on the side channel."""
    prefill, decode = make_cache(7), make_cache(8)
    channel = SideChannel(prefill, fake)
    channel.server.max_chunk_bytes = 2 * prefill.block_bytes  # bounds its byte reads only
    writes = recorded_writes(channel)
    try:
        remote, local = [7, 1, 4, 9, 0, 2], [3, 11, 5, 6, 2, 10]
        received, scattered = pull_from(channel, decode, fake.export(decode), remote, local, "t-1")
        assert writes == [6] and scattered == [] and received == 6 * decode.block_bytes
        for ours, theirs in zip(local, remote, strict=True):
            assert torch.equal(block_of(decode, ours), block_of(prefill, theirs))
        _, scattered = pull_from(channel, decode, None, remote, local, "t-bytes")
        assert writes == [6] and scattered == local  # shared memory: 3 reads of 2 blocks
        assert_released(channel, SendOutcome.DONE, count=2)
    finally:
        channel.close()


def test_a_prefill_that_bounds_in_place_reads_is_read_in_chunks_from_then_on(fake):
    """A prefill of an older version refuses an in-place read over its max_chunk_bytes
    (too_large): the pull goes on in reads of max_chunk_bytes, and later pulls from that
    endpoint start so."""
    prefill, decode = make_cache(9), make_cache(10)
    channel = SideChannel(prefill, fake)
    writes = recorded_writes(channel)
    served = channel.server._read
    refused = []

    def older_server(peer, request):
        if len(request.block_ids) > 2:
            refused.append(len(request.block_ids))
            return [wire.error(request.transfer_id, wire.TOO_LARGE, "over max_chunk_bytes")]
        return served(peer, request)

    channel.server._read = older_server
    try:
        remote, local = [7, 1, 4, 9, 0], [3, 11, 5, 6, 2]
        target = fake.export(decode)
        pull_from(channel, decode, target, remote, local, "t-old")
        assert refused == [5] and writes == [2, 2, 1]
        for ours, theirs in zip(local, remote, strict=True):
            assert torch.equal(block_of(decode, ours), block_of(prefill, theirs))
        pull_from(channel, decode, target, remote, local, "t-old-2")
        assert refused == [5] and writes == [2, 2, 1, 2, 2, 1]
        assert_released(channel, SendOutcome.DONE, count=2)
    finally:
        channel.close()


def test_unopenable_handles_fall_back_to_bytes_and_are_not_sent_again(fake):
    prefill, decode = make_cache(3), make_cache(4)
    fake.fail_open = True
    channel = SideChannel(prefill, fake)
    try:
        target = fake.export(decode)
        remote, local = [2, 3, 4], [9, 10, 11]
        _, scattered = pull_from(channel, decode, target, remote, local, "t-fallback")
        assert scattered == local and channel.server.bytes_ipc == 0 and fake.opened == 1
        for theirs, ours in zip(remote, local, strict=True):
            assert torch.equal(block_of(decode, ours), block_of(prefill, theirs))
        fake.fail_open = False  # would work now, but this endpoint is remembered
        _, scattered = pull_from(channel, decode, target, [5], [1], "t-again")
        assert scattered == [1] and channel.server.bytes_ipc == 0 and fake.opened == 1
        assert_released(channel, SendOutcome.DONE, count=2)
    finally:
        channel.close()


def test_a_prefill_without_the_path_answers_with_bytes(fake):
    prefill, decode = make_cache(5), make_cache(6)
    channel = SideChannel(prefill, None)
    try:
        target = fake.export(decode)
        _, scattered = pull_from(channel, decode, target, [1, 2], [3, 4], "t-plain")
        assert scattered == [3, 4]
        assert torch.equal(block_of(decode, 4), block_of(prefill, 2))
    finally:
        channel.close()


def test_mappings_are_opened_once_and_closed_when_their_last_peer_is_dropped(fake):
    prefill, first, second = make_cache(19), make_cache(20), make_cache(21)
    writer = CudaIpcWriter(prefill, driver=fake, max_peers=1)
    first_target = fake.export(first)
    writer.write([1], first_target, [2])
    # same allocation, fewer blocks: another peer entry, the same mapping
    writer.write([1], msgspec.structs.replace(first_target, num_blocks=4), [3])
    assert fake.opened == 1 and len(fake.mapped) == 1
    writer.write([4], fake.export(second), [5])  # evicts both entries of the first
    assert fake.opened == 2 and fake.mapped == [second.storages[0].data_ptr()]
    assert torch.equal(block_of(second, 5), block_of(prefill, 4))
    writer.close()
    assert fake.mapped == []


def test_the_real_driver_refuses_a_handle_it_cannot_open_as_unavailable(fake):
    """No fake: here the CUDA driver is missing (CPU) or the handle names nothing (a GPU);
    either way the writer says IpcUnavailable (the server answers ipc_unavailable)."""
    writer = CudaIpcWriter(make_cache(22))
    with pytest.raises(IpcUnavailable):
        writer.write([1], fake.export(make_cache(23)), [2])
    writer.close()


# ---- the real thing, between two processes (a GPU machine) -----------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_PREFILL_PROCESS = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from cuda_ipc_harness import SideChannel, make_cache
    from test_cuda_ipc import REMOTE
    from vllm_llmd.transfer.cuda_ipc import cuda_driver
    channel = SideChannel(make_cache(1, device="cuda"), cuda_driver())
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
    decode = make_cache(2, device="cuda")
    expected = [block_of(make_cache(1, device="cuda"), b) for b in REMOTE]
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
        received, scattered = pull(endpoint, decode, target, REMOTE, LOCAL, "t-cuda")
        torch.cuda.synchronize()
        assert scattered == [] and received == len(REMOTE) * decode.block_bytes
        for block_id, want in zip(LOCAL, expected, strict=True):
            assert torch.equal(block_of(decode, block_id), want)
        # a claim of 1 TiB, consistent with itself: only the real allocation's size refuses it
        before = [block_of(decode, b) for b in range(SHAPE.num_blocks)]
        claim = 1 << 40
        lying = lie(
            target,
            num_blocks=(claim - max(target.segment_offsets)) // target.block_stride,
            storage={"size_bytes": claim},
        )
        with pytest.raises(TransferFailed, match="allocation behind its handle has"):
            pull(endpoint, decode, lying, REMOTE[:1], LOCAL[:1], "t-big")
        torch.cuda.synchronize()
        assert all(torch.equal(block_of(decode, b), before[b]) for b in range(SHAPE.num_blocks))
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
