"""CURVE on the KV-event streams (events/curve.py, connector/curve_publisher.py).

- vLLM's own publisher in this process, built as the plugin builds it from the environment:
  a reader with the keys hears every batch, live and through replay; a reader in clear, one
  with a key the pod does not admit, and one with the wrong pod key hear nothing (checked
  beside the good reader, which hears the same batches in the same time);
- key files and folders that cannot be used are refused with their name;
- end to end: a real `vllm serve` with the CURVE variables set (the plugin installs the
  publisher in the engine process): the router's ingestor with the keys indexes its blocks,
  one in clear indexes none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from conftest import llmd_host_tier
from factories import vllm_stored_batch
from router_harness import wait_for
from vllm.distributed import kv_events as vllm_events

from vllm_llmd.connector.curve_publisher import CurveEventPublisher, install, make_publisher
from vllm_llmd.devtools.client import complete
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, event_endpoints, free_port, kv_events_config
from vllm_llmd.events import __main__ as events_cli
from vllm_llmd.events.curve import (
    CLIENTS_ENV,
    SECRET_KEY_ENV,
    CurveClientKeys,
    CurveKeyError,
    CurveServerKeys,
)
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.router.config_parse import parse_config
from vllm_llmd.router.index import InMemoryIndex
from vllm_llmd.router.ingest import EventIngestor


class Keys:
    """Key files as an operator makes them: the pods' pair, the router's, a stranger's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clients = root / "clients"
        self.clients.mkdir(parents=True)
        for name in ("pods", "router", "stranger", "other-pods"):
            zmq.auth.create_certificates(root, name)
        (self.clients / "router.key").write_bytes((root / "router.key").read_bytes())

    def env(self, admit_only_listed: bool = True) -> dict[str, str]:
        env = {SECRET_KEY_ENV: str(self.root / "pods.key_secret")}
        if admit_only_listed:
            env[CLIENTS_ENV] = str(self.clients)
        return env

    def reader(self, name: str = "router", pods: str = "pods") -> CurveClientKeys:
        return CurveClientKeys.load(self.root / f"{name}.key_secret", self.root / f"{pods}.key")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def _publish(publisher: vllm_events.EventPublisher, hashes: list[int]) -> None:
    publisher.publish(vllm_stored_batch(hashes))


@pytest.fixture
def curve_publisher(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """(publisher, endpoint, replay endpoint), built as vLLM builds its "zmq" publisher."""
    for name, value in keys.env().items():
        monkeypatch.setenv(name, value)
    port, replay_port = free_port(), free_port()
    publisher = make_publisher(
        data_parallel_rank=0,
        endpoint=f"tcp://*:{port}",
        replay_endpoint=f"tcp://*:{replay_port}",
        topic="kv",
    )
    yield publisher, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"
    publisher.shutdown()


def _batches(ingestor: EventIngestor, pod: str) -> int:
    return ingestor.stats()[pod]["num_batches"]


def test_a_reader_with_the_keys_hears_live_and_replayed_events_and_no_one_else(
    keys: Keys, curve_publisher: tuple
) -> None:
    publisher, endpoint, replay = curve_publisher
    assert isinstance(publisher, CurveEventPublisher)
    _publish(publisher, [1, 2])
    time.sleep(0.3)  # in the replay buffer before anyone subscribes
    readers = {
        "keys": EventIngestor(InMemoryIndex(), curve=keys.reader()),
        "clear": EventIngestor(InMemoryIndex()),
        "stranger": EventIngestor(InMemoryIndex(), curve=keys.reader("stranger")),
        "wrong-pod-key": EventIngestor(InMemoryIndex(), curve=keys.reader(pods="other-pods")),
    }
    try:
        for ingestor in readers.values():
            ingestor.add_pod("pod", endpoint, replay, topic="kv")
        wait_for(lambda: _batches(readers["keys"], "pod") == 1)  # the replayed batch
        time.sleep(0.3)  # subscribed: what follows comes live
        _publish(publisher, [3])
        _publish(publisher, [4, 5])
        wait_for(lambda: _batches(readers["keys"], "pod") == 3)
        assert readers["keys"].index.lookup_prefix([1, 2])["pod"].num_blocks == 2
        assert readers["keys"].index.lookup_prefix([4, 5])["pod"].num_blocks == 2
        time.sleep(0.5)  # as long again as the good reader needed, and more
        for name in ("clear", "stranger", "wrong-pod-key"):
            assert _batches(readers[name], "pod") == 0, name
            assert readers[name].index.lookup_prefix([1, 2]) == {}, name
    finally:
        for ingestor in readers.values():
            ingestor.close()


def test_without_an_admitted_folder_any_reader_with_the_pod_key_is_heard(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, keys.env(admit_only_listed=False)[SECRET_KEY_ENV])
    monkeypatch.delenv(CLIENTS_ENV, raising=False)
    port = free_port()
    publisher = make_publisher(data_parallel_rank=0, endpoint=f"tcp://*:{port}", topic="kv")
    stranger = EventIngestor(InMemoryIndex(), curve=keys.reader("stranger"))
    clear = EventIngestor(InMemoryIndex())
    try:
        for ingestor in (stranger, clear):
            ingestor.add_pod("pod", f"tcp://127.0.0.1:{port}", topic="kv")
        # no replay: publish until the live subscription has joined
        deadline = time.monotonic() + 10
        while _batches(stranger, "pod") == 0 and time.monotonic() < deadline:
            _publish(publisher, [7])
            time.sleep(0.1)
        assert _batches(stranger, "pod") > 0
        assert _batches(clear, "pod") == 0  # still encrypted: no key, no events
    finally:
        stranger.close()
        clear.close()
        publisher.shutdown()


def test_without_keys_in_the_environment_vllms_own_publisher_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    monkeypatch.delenv(CLIENTS_ENV, raising=False)
    install()
    config = vllm_events.KVEventsConfig(
        enable_kv_cache_events=True, endpoint=f"tcp://*:{free_port()}", topic="kv"
    )
    publisher = vllm_events.EventPublisherFactory.create(config)
    try:
        assert type(publisher) is vllm_events.ZmqEventPublisher
    finally:
        publisher.shutdown()


def test_unusable_keys_are_refused_by_name(keys: Keys, tmp_path: Path) -> None:
    secret = str(keys.root / "pods.key_secret")
    with pytest.raises(CurveKeyError, match=r"holds no secret key.*NAME\.key_secret"):
        CurveServerKeys.from_env({SECRET_KEY_ENV: str(keys.root / "pods.key")})
    with pytest.raises(CurveKeyError, match=f"{SECRET_KEY_ENV} '/nowhere' is not a readable"):
        CurveServerKeys.from_env({SECRET_KEY_ENV: "/nowhere"})
    with pytest.raises(CurveKeyError, match=f"{CLIENTS_ENV} '/nowhere' is not a folder"):
        CurveServerKeys.from_env({SECRET_KEY_ENV: secret, CLIENTS_ENV: "/nowhere"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CurveKeyError, match="holds no public certificate"):
        CurveServerKeys.from_env({SECRET_KEY_ENV: secret, CLIENTS_ENV: str(empty)})
    with pytest.raises(CurveKeyError, match=f"{CLIENTS_ENV} is set but {SECRET_KEY_ENV}"):
        CurveServerKeys.from_env({CLIENTS_ENV: str(keys.clients)})
    assert CurveServerKeys.from_env({}) is None
    with pytest.raises(CurveKeyError, match=r"CURVE secret key .*router\.key' holds no secret"):
        CurveClientKeys.load(keys.root / "router.key", keys.root / "pods.key")
    # the secret key never shows in a repr (a log line)
    loaded = keys.reader()
    assert loaded.secret.decode() not in repr(loaded)
    server = CurveServerKeys.from_env(keys.env())
    assert server is not None and server.secret.decode() not in repr(server)


def test_curve_needs_the_pyzmq_transport(keys: Keys) -> None:
    with pytest.raises(ValueError, match="NULL security only: CURVE keys need transport 'zmq'"):
        Subscriber("tcp://127.0.0.1:1", transport="zmtp", curve=keys.reader())
    with pytest.raises(ValueError, match="CURVE keys need transport 'zmq'"):
        EventIngestor(InMemoryIndex(), transport="zmtp", curve=keys.reader())


def test_a_publisher_that_connects_out_is_refused_with_curve(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in keys.env().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="connects out; a CURVE publisher binds"):
        make_publisher(data_parallel_rank=0, endpoint=f"tcp://127.0.0.1:{free_port()}")


@pytest.mark.server
def test_a_real_pod_publishes_only_to_readers_with_the_keys(
    keys: Keys, tiny_model: Path, vllm_servers
) -> None:
    events = kv_events_config()
    config = VLLMServerConfig(
        model=tiny_model,
        max_model_len=2048,
        kv_transfer_config=llmd_host_tier(),
        kv_events_config=events,
        env=keys.env(),
    )
    server = vllm_servers.launch(config, "events-curve")
    endpoint, replay = event_endpoints(config)
    with (
        EventIngestor(InMemoryIndex(), curve=keys.reader()) as reader,
        EventIngestor(InMemoryIndex()) as clear,
    ):
        for ingestor in (reader, clear):
            ingestor.add_pod("pod", endpoint, replay, topic="kv")
        complete(server.url, server.model_name, sample_text(300, seed=9100), max_tokens=2)
        # the device blocks and the host tier's copies, both through the CURVE publisher
        wait_for(lambda: reader.stats()["pod"]["num_events"] >= 2, 60)
        assert clear.stats()["pod"]["num_batches"] == 0
    log = server.log_path.read_text()
    assert "KV events: CURVE on, admitting the readers whose keys are in" in log
    assert keys.reader().secret.decode() not in log


def test_the_watcher_reads_an_encrypted_stream_with_the_keys(
    keys: Keys, curve_publisher: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher, endpoint, replay = curve_publisher
    _publish(publisher, [21, 22, 23])
    time.sleep(0.3)  # in the replay buffer: the watcher reads it first
    root = keys.root
    keys_args = ["--curve-key", str(root / "router.key_secret")]
    keys_args += ["--curve-pod-key", str(root / "pods.key")]
    argv = ["watch", endpoint, "--replay", replay, "--topic", "kv", "--duration", "3"]
    assert events_cli.main(argv + keys_args) == 0
    assert "BlockStored" in capsys.readouterr().out
    # one key alone, and a public certificate where the secret one goes: said, exit 2
    assert events_cli.main(argv + keys_args[:2]) == 2
    assert "--curve-key and --curve-pod-key go together" in capsys.readouterr().err
    bad = ["--curve-key", str(root / "router.key"), "--curve-pod-key", str(root / "pods.key")]
    assert events_cli.main(argv + bad) == 2
    assert "holds no secret key" in capsys.readouterr().err


def test_the_routers_curve_flags_are_checked_when_parsed(
    keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    root = keys.root
    pod = ["--pod", "http://127.0.0.1:1"]
    key, pod_key = str(root / "router.key_secret"), str(root / "pods.key")
    curve = ["--kv-events-curve-key", key, "--kv-events-curve-pod-key", pod_key]
    config = parse_config([*pod, "--kv-events-transport", "zmq", *curve], environ={})
    assert config.kv_events_curve() == keys.reader()
    assert parse_config(pod, environ={}).kv_events_curve() is None
    refused = {
        "go together": ["--kv-events-curve-key", key],
        "needs --kv-events-transport zmq": [
            "--kv-events-curve-key",
            key,
            "--kv-events-curve-pod-key",
            pod_key,
        ],
        "holds no secret key": [
            "--kv-events-transport",
            "zmq",
            "--kv-events-curve-key",
            pod_key,
            "--kv-events-curve-pod-key",
            pod_key,
        ],
    }
    for said, flags in refused.items():
        with pytest.raises(SystemExit):
            parse_config(pod + flags, environ={})
        assert said in capsys.readouterr().err
