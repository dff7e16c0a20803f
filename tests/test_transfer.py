"""The P/D transfer pieces without vLLM: registry state machine, wire, params, config, and a
real ZMQ side channel between a TransferServer and pull_blocks (real sockets, real tensors)."""

from __future__ import annotations

import msgspec
import pytest
import torch
from conftest import FakeClock
from factories import make_fingerprint

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks, release_transfer
from vllm_llmd.transfer.params import ParamsError, RemotePrefillParams, prompt_digest
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry, SendState
from vllm_llmd.transfer.server import PeerBuffers, TransferServer

NUM_LAYERS, PAGE = 3, 96
FINGERPRINT = make_fingerprint(num_layers=NUM_LAYERS, head_size=8, page_bytes=PAGE)


# ---- registry --------------------------------------------------------------------------------


def test_registry_release_frees_and_reading_is_never_freed():
    clock = FakeClock()
    registry = SendRegistry(lease_s=10, clock=clock)
    registry.add("req", "t1", [4, 5])
    assert registry.begin_read("t1", [4]) is None
    clock.now += 60  # far past the lease, but a read is in progress
    assert registry.take_finished() == []
    assert registry.release("t1", True) is False  # not while reading
    registry.end_read("t1")  # renews the lease
    assert registry.take_finished() == []
    assert registry.release("t1", True)
    [done] = registry.take_finished()
    assert (done.request_id, done.state, done.outcome) == (
        "req",
        SendState.RELEASED,
        SendOutcome.DONE,
    )
    assert len(registry) == 0


def test_registry_lease_expiry_and_bad_reads():
    clock = FakeClock()
    registry = SendRegistry(lease_s=10, clock=clock)
    registry.add("req", "t1", [1, 2])
    assert "does not hold" in registry.begin_read("t1", [3])
    assert "unknown" in registry.begin_read("nope", [1])
    clock.now += 9.9
    assert registry.take_finished() == []
    clock.now += 0.2
    [expired] = registry.take_finished()
    assert expired.outcome == SendOutcome.EXPIRED
    assert "unknown" in registry.begin_read("t1", [1])


def test_registry_failed_release_frees():
    registry = SendRegistry(lease_s=10)
    registry.add("req", "t1", [1])
    assert registry.release("t1", False, "decode gave up")
    [send] = registry.take_finished()
    assert (send.outcome, send.reason) == (SendOutcome.FAILED, "decode gave up")


# ---- wire, params, config --------------------------------------------------------------------


def test_wire_refuses_oversized_undecodable_and_other_versions():
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode_request(b"x" * (wire.MAX_CONTROL_BYTES + 1))
    with pytest.raises(wire.WireError, match="undecodable"):
        wire.decode_request(b"\x93garbage")
    future = wire.ReleaseTransfer(version=99, transfer_id="t", success=True)
    with pytest.raises(wire.WireError, match="v99"):
        wire.decode_request(wire.encode(future))
    message = wire.ReleaseTransfer(version=wire.PROTOCOL_VERSION, transfer_id="t", success=True)
    assert wire.decode_request(wire.encode(message)) == message


def test_params_round_trip_and_errors():
    params = RemotePrefillParams(
        engine_id="e",
        request_id="r",
        host="127.0.0.1",
        ports=(5000,),
        block_ids=(3, 4),
        num_tokens=40,
        transfer_id="tid",
        fingerprint=FINGERPRINT,
        prompt_digest=prompt_digest([1, 2, 3]),
    )
    as_json = msgspec.json.decode(msgspec.json.encode(params.to_dict()))  # through a proxy
    assert RemotePrefillParams.from_dict(as_json) == params
    del as_json["llmd_ports"]
    with pytest.raises(ParamsError, match="llmd_ports"):
        RemotePrefillParams.from_dict(as_json)
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 4])


def test_config_refuses_unknown_keys_and_bad_types():
    assert LLMDConnectorConfig.from_extra_config({"lease_s": 5}).lease_s == 5.0
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config key\(s\) \['lease'\]"):
        LLMDConnectorConfig.from_extra_config({"lease": 5})
    with pytest.raises(ValueError, match=r"side_channel_port.*must be int"):
        LLMDConnectorConfig.from_extra_config({"side_channel_port": "5600"})
    with pytest.raises(ValueError, match="lease_s must be > 0"):
        LLMDConnectorConfig.from_extra_config({"lease_s": 0})


# ---- a real side channel ---------------------------------------------------------------------


def _byte_cache_server(same_host_shm: bool, **options):
    """A TransferServer over a real byte 'cache' of 16 blocks (gather = block-major copy)."""
    cache = torch.randint(0, 256, (16, NUM_LAYERS, PAGE), dtype=torch.uint8)
    gathers = []

    def gather(block_ids, out):
        gathers.append(list(block_ids))
        data = cache[torch.tensor(block_ids)].reshape(-1)
        if out is None:
            return data.clone()
        out.copy_(data)
        return out

    registry = SendRegistry(lease_s=30)
    server = TransferServer(
        "127.0.0.1",
        0,
        registry,
        gather,
        FINGERPRINT,
        NUM_LAYERS * PAGE,
        same_host_shm=same_host_shm,
        **options,
    )
    return server, registry, cache, gathers


@pytest.fixture(params=["shm", "socket"])
def side_channel(request):
    """Both transports: this process is on the prefill's host, so "shm" takes the shared
    memory path; "socket" is a prefill that never offers it (another host)."""
    server, registry, cache, gathers = _byte_cache_server(request.param == "shm")
    try:
        yield server, registry, cache, gathers
    finally:
        server.close()


def _pull(server, transfer_id, block_ids, fingerprint=FINGERPRINT, read_bytes=1 << 20):
    received = {}

    def scatter(first, data):
        received[first] = data.clone().view(-1, NUM_LAYERS, PAGE)

    spec = PullSpec(
        f"tcp://127.0.0.1:{server.port}",
        transfer_id,
        fingerprint,
        tuple(block_ids),
        NUM_LAYERS * PAGE,
    )
    nbytes = pull_blocks(
        spec, scatter, timeout_s=2, unknown_transfer_grace_s=0.3, max_chunk_bytes=read_bytes
    )
    return nbytes, torch.cat([received[k] for k in sorted(received)])


def test_peer_buffers_are_reused_per_peer_and_bounded_in_all():
    buffers = PeerBuffers(max_bytes=100)
    assert buffers.take(b"a", 10) is None  # none yet: the gather makes one
    buffers.keep(b"a", torch.zeros(40, dtype=torch.uint8))
    reused = buffers.take(b"a", 30)
    assert reused is not None and reused.numel() == 30
    buffers.keep(b"a", reused)  # a view of the kept buffer: the whole buffer stays
    assert buffers.take(b"a", 40) is not None and buffers.take(b"a", 41) is None
    buffers.keep(b"b", torch.zeros(50, dtype=torch.uint8))
    buffers.keep(b"c", torch.zeros(30, dtype=torch.uint8))  # 120 bytes: a's goes (least recent)
    assert buffers.take(b"a", 1) is None and buffers.take(b"b", 50) is not None
    buffers.forget(b"b")
    assert buffers.take(b"b", 1) is None and buffers.take(b"c", 30) is not None


def test_a_peers_socket_reads_gather_into_one_staging_buffer():
    """A new staging buffer per read paid a page fault per 4 KiB gathered: a peer's reads
    after the first gather into the buffer its first read made (its reply was sent by then)."""
    server, registry, cache, _ = _byte_cache_server(same_host_shm=False)
    outs = []
    gather = server._gather

    def recording(block_ids, out):
        outs.append(None if out is None else out.data_ptr())
        return gather(block_ids, out)

    server._gather = recording
    try:
        registry.add("req", "tid", [9, 2, 14, 5, 7])
        _, data = _pull(server, "tid", [9, 2, 14, 5, 7], read_bytes=2 * NUM_LAYERS * PAGE)
        assert torch.equal(data, cache[torch.tensor([9, 2, 14, 5, 7])])
        assert outs[0] is None and outs[1] == outs[2] is not None  # reads of 2, 2 and 1
    finally:
        server.close()


def test_a_threads_socket_reads_reuse_one_receive_buffer():
    """A new buffer per read paid a page fault per 4 KiB written (a quarter of a socket pull's
    time here): the reads of one thread land in one buffer, its data valid during the
    scatter call only."""
    server, registry, cache, _ = _byte_cache_server(same_host_shm=False)
    try:
        addresses, pulled, held = [], [], []

        def scatter(first, data):
            addresses.append(data.data_ptr())
            pulled.append(data.clone().view(-1, NUM_LAYERS, PAGE))
            held.append(data)  # alive: new buffers could not share an address

        for transfer_id, block_ids in (("t1", [9, 2, 14]), ("t2", [5, 7, 1])):
            registry.add("req-" + transfer_id, transfer_id, block_ids)
            spec = PullSpec(
                f"tcp://127.0.0.1:{server.port}", transfer_id, FINGERPRINT, tuple(block_ids),
                NUM_LAYERS * PAGE,
            )  # fmt: skip
            pull_blocks(
                spec, scatter, timeout_s=2, unknown_transfer_grace_s=0.3,
                max_chunk_bytes=2 * NUM_LAYERS * PAGE,
            )  # fmt: skip
        assert len(addresses) == 4 and len(set(addresses)) == 1  # 2 + 1 and 2 + 1 blocks
        assert torch.equal(torch.cat(pulled), cache[torch.tensor([9, 2, 14, 5, 7, 1])])
    finally:
        server.close()


def test_pull_in_reads_then_release(side_channel):
    server, registry, cache, gathers = side_channel
    blocks = [9, 2, 14, 5, 7]
    registry.add("req", "tid", blocks)
    nbytes, data = _pull(server, "tid", blocks, read_bytes=2 * NUM_LAYERS * PAGE)
    assert nbytes == len(blocks) * NUM_LAYERS * PAGE
    assert torch.equal(data, cache[torch.tensor(blocks)])
    assert gathers == [[9, 2], [14, 5], [7]]  # three reads of at most two blocks
    [send] = registry.take_finished()  # released by the puller
    assert send.outcome == SendOutcome.DONE
    # the bytes went the way the server offers: shared memory on this host, else the socket
    moved = (server.bytes_shared, server.bytes_sent)
    assert moved == ((nbytes, 0) if server.host_id else (0, nbytes))


def _llmd_segments() -> set[str]:
    import os

    return {name for name in os.listdir("/dev/shm") if name.startswith("llmd_kv_")}


def test_same_host_segments_are_reused_per_peer_and_unlinked_on_close():
    before = _llmd_segments()
    server, registry, cache, _ = _byte_cache_server(same_host_shm=True)
    try:
        for i in range(3):
            registry.add(f"req{i}", f"tid{i}", [1, 2, 3])
            _, data = _pull(server, f"tid{i}", [1, 2, 3])
            assert torch.equal(data, cache[torch.tensor([1, 2, 3])])
        assert len(_llmd_segments() - before) == 1  # one peer (this thread): one segment
    finally:
        server.close()
    assert _llmd_segments() == before


def test_a_segment_that_cannot_be_opened_falls_back_to_the_socket(monkeypatch):
    from vllm_llmd.transfer import shm

    def refuse(self, name, nbytes):
        raise OSError("another IPC namespace")

    monkeypatch.setattr(shm.ShmReader, "view", refuse)
    server, registry, cache, gathers = _byte_cache_server(same_host_shm=True)
    try:
        registry.add("req", "tid", [4, 6])
        nbytes, data = _pull(server, "tid", [4, 6])
        assert torch.equal(data, cache[torch.tensor([4, 6])])
        assert server.bytes_sent == nbytes  # the read was answered again, through the socket
        assert gathers == [[4, 6], [4, 6]]
        [send] = registry.take_finished()
        assert send.outcome == SendOutcome.DONE
    finally:
        server.close()


def test_pull_refused_on_fingerprint_mismatch(side_channel):
    server, registry, *_ = side_channel
    registry.add("req", "tid", [1])
    other = msgspec.structs.replace(FINGERPRINT, dtype="bfloat16")
    # the peer learns which field differs, never the prefill's value (it could forge params)
    with pytest.raises(TransferFailed, match=r"KV layouts differ .* in: dtype$") as refused:
        _pull(server, "tid", [1], fingerprint=other)
    assert "float32" not in str(refused.value)
    [send] = registry.take_finished()  # the failed pull still released the blocks
    assert send.outcome == SendOutcome.FAILED


def test_pull_of_unknown_transfer_fails_after_grace(side_channel):
    server, registry, *_ = side_channel
    registry.add("req", "tid", [1, 2])
    with pytest.raises(TransferFailed, match="unknown"):
        _pull(server, "not-the-id", [1])
    assert registry.take_finished() == [] and len(registry) == 1  # a wrong id frees nothing
    with pytest.raises(TransferFailed, match="does not hold"):
        _pull(server, "tid", [3])
    # Whoever holds the id and gives up releases the blocks at once.
    [send] = registry.take_finished()
    assert send.outcome == SendOutcome.FAILED


def test_pull_from_nobody_times_out():
    from vllm_llmd.devtools.server import free_port

    spec = PullSpec(f"tcp://127.0.0.1:{free_port()}", "tid", FINGERPRINT, (1,), NUM_LAYERS * PAGE)
    with pytest.raises(TransferFailed, match="did not answer within 300 ms"):
        pull_blocks(
            spec,
            lambda *_: None,
            timeout_s=0.3,
            unknown_transfer_grace_s=0,
            max_chunk_bytes=1 << 20,
        )


def test_release_without_read(side_channel):
    server, registry, *_ = side_channel
    registry.add("req", "tid", [1])
    release_transfer(f"tcp://127.0.0.1:{server.port}", "tid", "cached locally", timeout_s=2)
    [send] = registry.take_finished()
    assert (send.outcome, send.reason) == (SendOutcome.FAILED, "cached locally")
