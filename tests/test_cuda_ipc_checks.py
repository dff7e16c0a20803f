"""What a decode worker's description of its KV cache may claim, as a same-host prefill
worker's CUDA IPC writer checks it (transfer/cuda_ipc.py, ipc_checks.py): every field a peer
sends is checked before anything is opened, the claimed storage against the allocation's real
size, the peer's layout and ids; no torch ref counter from the wire. Nothing is written when a
check refuses.

A fake stands in for the CUDA driver's four IPC calls only (`cuda_ipc_harness.FakeDriver`, no
GPU here); the checks, the side channel and the copies are real.
"""

from __future__ import annotations

import msgspec
import pytest
import torch
from cuda_ipc_harness import (
    SHAPE,
    FakeDriver,
    SideChannel,
    assert_released,
    block_of,
    fingerprint_of,
    lie,
    make_cache,
    pull_from,
)

from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import TransferFailed
from vllm_llmd.transfer.cuda_ipc import CudaIpcWriter, IpcUnavailable, export_cache
from vllm_llmd.transfer.registry import SendOutcome


@pytest.fixture
def fake():
    return FakeDriver()


def test_export_sends_the_handle_and_where_the_storage_lies_only(fake):
    decode = make_cache(12)
    target = fake.export(decode)
    (storage,) = target.storages  # every layer of this layout is in one allocation
    allocation = decode.storages[0]
    assert storage.handle in fake.allocations and len(storage.handle) == 64
    assert (storage.offset_bytes, storage.size_bytes) == (0, allocation.nbytes())
    assert wire.CudaIpcStorage.__struct_fields__ == ("handle", "offset_bytes", "size_bytes")
    assert [name for name, _ in fake.calls] == ["allocation_range", "export_handle"]


def test_a_description_that_overruns_its_storage_is_refused_before_any_write(fake):
    prefill, decode = make_cache(7), make_cache(8)
    channel = SideChannel(prefill, fake)
    try:
        target = fake.export(decode)
        lying = lie(target, num_blocks=target.num_blocks * 4)  # past the end of its storage
        before = [block_of(decode, b) for b in range(SHAPE.num_blocks)]
        with pytest.raises(TransferFailed, match=r"but storages\[0\] has"):
            pull_from(channel, decode, lying, [1], [40], "t-lie")
        assert all(torch.equal(block_of(decode, b), before[b]) for b in range(SHAPE.num_blocks))
        assert fake.opened == 0  # refused from the description alone
        assert_released(channel, SendOutcome.FAILED)  # the decode side said so: freed at once
    finally:
        channel.close()


def test_a_storage_claimed_larger_than_its_allocation_is_refused_before_any_write(fake):
    """The peer claims a storage (and blocks) 4x its real allocation: consistent with itself,
    so only the allocation's real size, from the driver, can refuse it. torch's
    `_new_shared_cuda` built a storage of the claimed size, and the kernels wrote past the end."""
    prefill, decode = make_cache(13), make_cache(14)
    channel = SideChannel(prefill, fake)
    try:
        target = fake.export(decode)
        real = target.storages[0].size_bytes
        lying = lie(target, num_blocks=target.num_blocks * 4, storage={"size_bytes": real * 4})
        before = [block_of(decode, b) for b in range(SHAPE.num_blocks)]
        with pytest.raises(TransferFailed, match=f"allocation behind its handle has {real} bytes"):
            pull_from(channel, decode, lying, [1], [40], "t-big")
        assert all(torch.equal(block_of(decode, b), before[b]) for b in range(SHAPE.num_blocks))
        assert fake.opened == 1 and fake.mapped == []  # opened to learn its size, closed again
        assert_released(channel, SendOutcome.FAILED)
        # an honest description still works after it
        pull_from(channel, decode, target, [2], [3], "t-honest")
        assert torch.equal(block_of(decode, 3), block_of(prefill, 2))
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
    prefill, decode = make_cache(15), make_cache(16)
    writer = CudaIpcWriter(prefill, driver=fake)
    lying = lie(fake.export(decode), **changes)
    before = [block_of(decode, b) for b in range(SHAPE.num_blocks)]
    with pytest.raises(ValueError, match=field):
        writer.write([1], lying, ids)
    assert all(torch.equal(block_of(decode, b), before[b]) for b in range(SHAPE.num_blocks))
    assert fake.opened == (1 if "allocation" in field else 0) and fake.mapped == []
    # what the wire does with it: msgpack carries each such value and decoding keeps it as
    # sent (so the checks above are what refuse it), but for a type msgspec refuses itself
    request = wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id="t",
        fingerprint=fingerprint_of(decode),
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
    prefill, decode = make_cache(17), make_cache(18)
    target = fake.export(decode)
    request = wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION,
        transfer_id="t",
        fingerprint=fingerprint_of(decode),
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
        pull_from(channel, decode, target, [1, 4], [2, 5], "t-counter")
        assert torch.equal(block_of(decode, 5), block_of(prefill, 4))
    finally:
        channel.close()
    assert shared_cuda_calls == []
    assert counter.read_bytes() == (7).to_bytes(8, "little") * 4
    handles = {storage.handle for storage in target.storages}
    pointers = {storage.data_ptr() for storage in decode.storages}
    for name, argument in fake.calls:
        assert argument in (handles if name == "open_handle" else pointers), (name, argument)


def test_writer_checks_the_peer_layout_and_ids(fake):
    prefill = make_cache(9)
    other_layout = make_cache(10, layout="BLHNC")  # one segment per block, not per layer
    writer = CudaIpcWriter(prefill, driver=fake)
    with pytest.raises(ValueError, match="pages"):
        writer.write([1], fake.export(other_layout), [1])
    decode = make_cache(11)
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
