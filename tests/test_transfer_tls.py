"""The side channel with mutual TLS (issue 22): real sockets, certificates made at test time.

What each test proves: a pull over TLS is byte-exact (socket and same-host shared memory); a
peer without a certificate of the CA (plain TCP, another CA, none at all) is closed at the
handshake, before the server reads a request: nothing is gathered, the transfer stays held for
its legitimate puller, and the server serves on; the decode side refuses a prefill whose
certificate another CA signed; a handshake never finished is cut at `request_timeout_s`; the
three config keys are all or nothing, and a bad file is named with its key and path.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import torch
from test_transfer import FINGERPRINT, NUM_LAYERS, PAGE, _byte_cache_server

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.devtools.certs import issue_certificate
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks, release_transfer
from vllm_llmd.transfer.framing import MAGIC, frame
from vllm_llmd.transfer.registry import SendOutcome, SendRegistry
from vllm_llmd.transfer.server import TransferServer
from vllm_llmd.transfer.tls import make_client_context, make_server_context

BLOCK_BYTES = NUM_LAYERS * PAGE


# ---- certificates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory)


def make_pki(tmp_path_factory) -> Path:
    """ca signs prefill and decode; rogue-ca signs rogue (a peer of another deployment)."""
    folder = tmp_path_factory.mktemp("pki")
    ca = issue_certificate(folder, "ca", None)
    issue_certificate(folder, "prefill", ca)
    issue_certificate(folder, "decode", ca)
    issue_certificate(folder, "rogue", issue_certificate(folder, "rogue-ca", None))
    return folder


def _files(pki: Path, name: str, ca: str = "ca") -> tuple[str, str, str]:
    return str(pki / f"{name}.crt"), str(pki / f"{name}.key"), str(pki / f"{ca}.crt")


def _client_without_cert(pki: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(pki / "ca.crt")
    return context


# ---- a side channel with TLS ---------------------------------------------------------------------


@pytest.fixture
def tls_channel(pki):
    """A prefill with TLS that never offers shared memory (every byte through the socket)."""
    server, registry, cache, gathers = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "prefill"))
    )
    try:
        yield server, registry, cache, gathers
    finally:
        server.close()


def _pull(server, transfer_id, block_ids, tls, read_bytes=1 << 20, timeout_s=2.0):
    received = {}

    def scatter(first, data):
        received[first] = data.clone().view(-1, NUM_LAYERS, PAGE)

    spec = PullSpec(
        f"tcp://127.0.0.1:{server.port}", transfer_id, FINGERPRINT, tuple(block_ids), BLOCK_BYTES
    )
    nbytes = pull_blocks(
        spec,
        scatter,
        timeout_s=timeout_s,
        unknown_transfer_grace_s=0.3,
        max_chunk_bytes=read_bytes,
        tls=tls,
    )
    return nbytes, torch.cat([received[k] for k in sorted(received)])


def _assert_still_serves(server, registry, cache, pki, transfer_id="after") -> None:
    registry.add("req-" + transfer_id, transfer_id, [2, 5])
    _, data = _pull(server, transfer_id, [2, 5], make_client_context(*_files(pki, "decode")))
    assert torch.equal(data, cache[torch.tensor([2, 5])])


def _assert_untouched(registry, gathers) -> None:
    """Nothing was read, and the transfer is still held for its legitimate puller."""
    assert gathers == []
    assert registry.take_finished() == [] and len(registry) == 1
    assert registry.begin_read("tid", [1, 2]) is None
    registry.end_read("tid")


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_a_tls_pull_is_byte_exact(pki, transport):
    server, registry, cache, gathers = _byte_cache_server(
        same_host_shm=transport == "shm", tls=make_server_context(*_files(pki, "prefill"))
    )
    try:
        blocks = [9, 2, 14, 5, 7]
        registry.add("req", "tid", blocks)
        decode = make_client_context(*_files(pki, "decode"))
        nbytes, data = _pull(server, "tid", blocks, decode, read_bytes=2 * BLOCK_BYTES)
        assert nbytes == len(blocks) * BLOCK_BYTES
        assert torch.equal(data, cache[torch.tensor(blocks)])
        assert gathers == [[9, 2], [14, 5], [7]]
        [send] = registry.take_finished()
        assert send.outcome == SendOutcome.DONE
        # same host: the bytes through shared memory, the control messages through TLS
        assert (server.bytes_shared, server.bytes_sent) == (
            (nbytes, 0) if transport == "shm" else (0, nbytes)
        )
        assert server.connections.tls_refused == 0
    finally:
        server.close()


BIG_LAYERS, BIG_PAGE = 2, 64 << 10  # a large reply's blocks: many TLS records each pull


def _served_cache(pki, num_blocks: int) -> tuple[torch.Tensor, SendRegistry, TransferServer]:
    """A random cache of num_blocks blocks behind a TLS TransferServer (caller closes it)."""
    cache = torch.randint(0, 256, (num_blocks, BIG_LAYERS, BIG_PAGE), dtype=torch.uint8)

    def gather(block_ids, out):
        return cache[torch.tensor(block_ids)].reshape(-1)

    registry = SendRegistry(lease_s=30)
    server = TransferServer(
        "127.0.0.1",
        0,
        registry,
        gather,
        FINGERPRINT,  # compared as a whole: its page size need not be this cache's
        BIG_LAYERS * BIG_PAGE,
        same_host_shm=False,
        tls=make_server_context(*_files(pki, "prefill")),
    )
    return cache, registry, server


def _pull_all(server, registry, cache, transfer_id, max_chunk_bytes, tls) -> torch.Tensor:
    """Every block of cache, registered as transfer_id, pulled over TLS: what arrived."""
    received = torch.zeros_like(cache)

    def scatter(first, data):
        view = data.view(-1, BIG_LAYERS, BIG_PAGE)
        received[first : first + view.shape[0]] = view

    num_blocks = cache.shape[0]
    registry.add(f"req-{transfer_id}", transfer_id, list(range(num_blocks)))
    spec = PullSpec(
        f"tcp://127.0.0.1:{server.port}",
        transfer_id,
        FINGERPRINT,
        tuple(range(num_blocks)),
        BIG_LAYERS * BIG_PAGE,
    )
    nbytes = pull_blocks(
        spec,
        scatter,
        timeout_s=10,
        unknown_transfer_grace_s=0,
        max_chunk_bytes=max_chunk_bytes,
        tls=tls,
    )
    assert nbytes == cache.numel()
    return received


def test_a_large_tls_pull_is_byte_exact(pki):
    """MiBs per reply: many TLS records, partial non-blocking writes, buffered reads."""
    cache, registry, server = _served_cache(pki, 48)
    try:
        decode = make_client_context(*_files(pki, "decode"))
        received = _pull_all(server, registry, cache, "big", 2 << 20, decode)
        assert torch.equal(received, cache)
    finally:
        server.close()


def test_release_without_read_over_tls(tls_channel, pki):
    server, registry, *_ = tls_channel
    registry.add("req", "tid", [1])
    decode = make_client_context(*_files(pki, "decode"))
    release_transfer(f"tcp://127.0.0.1:{server.port}", "tid", "cached", timeout_s=2, tls=decode)
    [send] = registry.take_finished()
    assert (send.outcome, send.reason) == (SendOutcome.FAILED, "cached")


# ---- peers without a certificate of the CA ------------------------------------------------------


def test_a_plain_tcp_peer_is_refused_before_any_request_is_read(tls_channel, pki):
    server, registry, cache, gathers = tls_channel
    registry.add("req", "tid", [1, 2])
    read = wire.ReadBlocks(
        version=wire.PROTOCOL_VERSION, transfer_id="tid", fingerprint=FINGERPRINT, block_ids=[1]
    )
    got = b""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(3)
        sock.sendall(frame(read))  # the right transfer id, in clear
        try:
            while chunk := sock.recv(1 << 16):
                got += chunk
        except ConnectionResetError:
            pass
    assert MAGIC not in got and len(got) < 64  # closed: at most a TLS alert, no reply
    with pytest.raises(TransferFailed):  # a decode without TLS: refused the same way
        _pull(server, "tid", [1, 2], tls=None)
    _assert_untouched(registry, gathers)
    assert server.connections.tls_refused == 3  # the raw peer, the pull's read and its release
    _assert_still_serves(server, registry, cache, pki)


@pytest.mark.parametrize("peer", ["another CA", "no certificate"])
def test_a_decode_without_a_certificate_of_the_ca_is_refused(tls_channel, pki, peer):
    server, registry, cache, gathers = tls_channel
    registry.add("req", "tid", [1, 2])
    if peer == "another CA":
        # trusts our CA (so it gets as far as it can), presents the rogue CA's certificate
        tls = make_client_context(*_files(pki, "rogue", ca="ca"))
    else:
        tls = _client_without_cert(pki)
    with pytest.raises(TransferFailed, match="prefill worker"):
        _pull(server, "tid", [1, 2], tls)
    deadline = time.monotonic() + 3  # the refusal is counted as the loop closes it
    while server.connections.tls_refused == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections.tls_refused >= 1
    _assert_untouched(registry, gathers)
    _assert_still_serves(server, registry, cache, pki)


def test_a_prefill_of_another_ca_is_refused_by_the_decode(pki):
    server, registry, _, gathers = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "rogue", ca="ca"))
    )
    try:
        registry.add("req", "tid", [1, 2])
        with pytest.raises(TransferFailed, match="CERTIFICATE_VERIFY_FAILED"):
            _pull(server, "tid", [1, 2], make_client_context(*_files(pki, "decode")))
        _assert_untouched(registry, gathers)
    finally:
        server.close()


def test_a_handshake_never_finished_is_cut_and_logged_once(tls_channel, pki, caplog):
    server, registry, cache, _ = tls_channel
    server.connections.request_timeout_s = 0.3
    caplog.set_level(logging.WARNING, logger="vllm")
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        for sock in socks:
            sock.settimeout(3)
            assert sock.recv(1) == b""  # closed by the server, nothing sent
    finally:
        for sock in socks:
            sock.close()
    assert server.connections.tls_refused == 2
    records = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(records) == 1 and "no TLS handshake in 0.3s" in records[0].getMessage()
    _assert_still_serves(server, registry, cache, pki)


def test_an_idle_tls_connection_the_server_dropped_is_opened_again(tls_channel, pki):
    server, registry, cache, _ = tls_channel
    server.connections.max_connections = 1
    _assert_still_serves(server, registry, cache, pki, "first")  # our connection, idle now
    other = threading.Thread(
        target=_assert_still_serves, args=(server, registry, cache, pki, "other")
    )
    other.start()  # its connection replaces ours
    other.join()
    _assert_still_serves(server, registry, cache, pki, "again")
    assert server.connections.tls_refused == 0


# ---- config -------------------------------------------------------------------------------------


def _tls_config(cert: str, key: str, ca: str) -> dict[str, str]:
    return {"side_channel_tls_cert": cert, "side_channel_tls_key": key, "side_channel_tls_ca": ca}


def test_config_turns_tls_on_with_all_three_keys(pki):
    assert LLMDConnectorConfig().side_channel_tls(server_side=True) is None  # off by default
    config = LLMDConnectorConfig.from_extra_config(_tls_config(*_files(pki, "prefill")))
    for server_side in (True, False):
        context = config.side_channel_tls(server_side)
        assert context is not None and context is config.side_channel_tls(server_side)
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    "missing", ["side_channel_tls_cert", "side_channel_tls_key", "side_channel_tls_ca"]
)
def test_config_refuses_some_but_not_all_tls_keys(pki, missing):
    extra = _tls_config(*_files(pki, "prefill"))
    del extra[missing]
    with pytest.raises(ValueError, match=rf"missing \['{missing}'\]"):
        LLMDConnectorConfig.from_extra_config(extra)


def test_config_names_the_key_and_path_of_a_bad_tls_file(pki, tmp_path):
    cert, key, ca = _files(pki, "prefill")
    absent = str(tmp_path / "absent.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        (_tls_config(absent, key, ca), rf"'side_channel_tls_cert'.*cannot read '{absent}'"),
        (_tls_config(cert, str(tmp_path), ca), r"'side_channel_tls_key'.*cannot read"),
        (_tls_config(cert, key, str(not_pem)), rf"'side_channel_tls_ca'.*'{not_pem}' is not a PEM"),
        (_tls_config(cert, cert, ca), r"'side_channel_tls_key'.*not a PEM file with a PRIVATE KEY"),
        # a certificate with another's key
        (_tls_config(cert, str(pki / "decode.key"), ca), r"side_channel_tls_cert .* and .*_key"),
    ]
    for extra, refusal in cases:
        with pytest.raises(ValueError, match=refusal):
            LLMDConnectorConfig.from_extra_config(extra)


def test_a_failed_loop_answers_tls_peers_unavailable_at_once(tls_channel, pki):
    server, registry, *_ = tls_channel

    def broken(now: float) -> None:
        raise RuntimeError("selector gone")

    server.connections._expire = broken
    deadline = time.monotonic() + 3
    while server.failure is None and time.monotonic() < deadline:
        time.sleep(0.02)
    registry.add("req", "tid", [1])
    started = time.monotonic()
    with pytest.raises(TransferFailed, match=r"unavailable.*side channel failed: RuntimeError"):
        _pull(server, "tid", [1], make_client_context(*_files(pki, "decode")), timeout_s=5)
    assert time.monotonic() - started < 1  # answered through TLS, not timed out


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_reply_with_data_leaves_the_connection_uncorked(pki, tls):
    """The listener corks a reply's data part (full segments, not one per TLS record) and
    uncorks when it is sent: its tail and the next small reply (the release's Ack) go at once,
    not after the kernel's 200 ms cork timer."""
    server, registry, cache, _ = _byte_cache_server(
        same_host_shm=False, tls=make_server_context(*_files(pki, "prefill")) if tls else None
    )
    decode = make_client_context(*_files(pki, "decode")) if tls else None
    try:
        for i in range(3):
            registry.add(f"req{i}", f"t{i}", [3, 1, 4])
            start = time.monotonic()
            _, data = _pull(server, f"t{i}", [3, 1, 4], decode, read_bytes=2 * BLOCK_BYTES)
            assert time.monotonic() - start < 0.15
            assert torch.equal(data, cache[torch.tensor([3, 1, 4])])
        [connection] = server.connections._connections.values()
        assert not connection.corked
        assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    finally:
        server.close()


def test_tls_pulls_reuse_one_connection_and_read_many_records_per_socket_read(pki):
    """The decode side's SealedStream: one handshake for every pull of a thread, and a reply
    of many sealed records (5 MiB: five of 1 MiB) byte-exact."""
    cache, registry, server = _served_cache(pki, 40)
    decode = make_client_context(*_files(pki, "decode"))
    try:
        for i in range(3):
            received = _pull_all(server, registry, cache, f"t{i}", 8 << 20, decode)
            assert torch.equal(received, cache)
        assert server.connections._next_peer == 1  # one connection, one handshake
        assert [s.outcome for s in registry.take_finished()] == [SendOutcome.DONE] * 3
    finally:
        server.close()
