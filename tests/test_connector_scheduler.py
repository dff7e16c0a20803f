"""The scheduler half's prefill-side hand-off, driven with real vLLM Request objects: a request
that ends normally holds its blocks for the decode side; an aborted one holds nothing."""

from __future__ import annotations

import msgspec
import pytest
from factories import make_fingerprint, make_request, make_scheduler, remote_prefill_params
from vllm.v1.request import Request, RequestStatus

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import LLMDHandshake
from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
from vllm_llmd.transfer.params import RemotePrefillParams, prompt_digest

BLOCK = 32
FINGERPRINT = make_fingerprint()


def _prefill_scheduler() -> LLMDConnectorScheduler:
    scheduler = make_scheduler(engine_id="engine-p", producer=True)
    scheduler.set_worker_handshakes({0: LLMDHandshake(0, 5701)})
    return scheduler


def _finished_request(status: RequestStatus, num_tokens: int = 3 * BLOCK + 5) -> Request:
    params = {"do_remote_decode": True}
    request = make_request("req-1", range(num_tokens), params, max_tokens=1, block_size=None)
    request.num_computed_tokens = num_tokens
    request.status = status
    return request


@pytest.mark.parametrize(
    "status", [RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED]
)
def test_normal_finish_holds_blocks_and_answers_params(status):
    scheduler = _prefill_scheduler()
    delay_free, params = scheduler.request_finished(_finished_request(status), [7, 8, 9, 10])
    assert delay_free
    remote = RemotePrefillParams.from_dict(params)
    assert remote.block_ids == (7, 8, 9, 10) and remote.num_tokens == 3 * BLOCK + 5
    assert remote.ports == (5701,) and len(remote.transfer_id) >= 32
    [send] = scheduler.build_connector_meta(None).sends
    assert send.block_ids == (7, 8, 9, 10) and send.transfer_id == remote.transfer_id


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_aborted_request_frees_at_once(status):
    scheduler = _prefill_scheduler()
    assert scheduler.request_finished(_finished_request(status), [7, 8, 9, 10]) == (False, None)
    assert scheduler.build_connector_meta(None).is_empty()


def test_transfer_ids_are_unguessable():
    scheduler = _prefill_scheduler()
    ids = {
        scheduler.request_finished(_finished_request(RequestStatus.FINISHED_LENGTH_CAPPED), [1])[1][
            "llmd_transfer_id"
        ]
        for _ in range(50)
    }
    assert len(ids) == 50


# ---- decode side: kv_transfer_params come from the API client and are not trusted ----------

PROMPT = list(range(3 * BLOCK + 5))


def _decode_scheduler(**config) -> LLMDConnectorScheduler:
    return make_scheduler(config=LLMDConnectorConfig(**config), consumer=True)


def _valid_params(**changes) -> dict:
    return remote_prefill_params(PROMPT, **changes)


def _decode_request(params: dict) -> Request:
    return make_request("req-d", PROMPT, params, max_tokens=1, block_size=None)


HOSTILE = {
    # the review's crash: no ports (worker indexed ports[tp_rank] and killed the engine core)
    "no ports": {"llmd_ports": []},
    "ports not ints": {"llmd_ports": ["5701"]},
    "port out of range": {"llmd_ports": [70000]},
    "ports not a list": {"llmd_ports": 5701},
    "unequal TP": {"llmd_ports": [5701, 5702]},
    "tokens past the prompt": {"remote_num_tokens": 10**6, "remote_block_ids": list(range(7813))},
    "repeated block ids": {"remote_block_ids": [3, 3, 3, 3]},
    "negative block id": {"remote_block_ids": [-1, 8, 9, 10]},
    "block count off": {"remote_block_ids": [7, 8]},
    "host with a path": {"remote_host": "evil.example/x:1"},
    "host not a string": {"remote_host": ["h"]},
    "transfer id not url-safe": {"llmd_transfer_id": "a b\n"},
    "digest of another prompt": {"llmd_prompt_digest": prompt_digest([1, 2, 3])},
    "fingerprint of another layout": {
        "llmd_fingerprint": {**msgspec.to_builtins(FINGERPRINT), "dtype": "x"}
    },
    "fingerprint malformed": {"llmd_fingerprint": "m"},
    "no transfer id value": {"llmd_transfer_id": None},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_params_recompute_and_never_reach_the_worker_malformed(name):
    scheduler = _decode_scheduler()
    request = _decode_request(_valid_params(**HOSTILE[name]))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, None, 0)
    assert scheduler.request_finished(request, []) == (False, None)
    metadata = scheduler.build_connector_meta(None)
    assert not metadata.recvs
    # A release goes out only for params that parsed, and each names one port per TP rank.
    for release in metadata.releases:
        assert release.host == "10.0.0.5" and release.transfer_id == "t" * 32
        assert release.ports and all(1 <= port < 65536 for port in release.ports)
    assert len(metadata.releases) <= 1


def test_valid_params_are_loaded():
    scheduler = _decode_scheduler()
    request = _decode_request(_valid_params())
    assert scheduler.get_num_new_matched_tokens(request, 0) == (len(PROMPT), True)


def test_host_outside_the_allowlist_gets_no_pull_and_no_release():
    scheduler = _decode_scheduler(allowed_prefill_hosts="10.1.0.0/16, prefill-0.svc")
    request = _decode_request(_valid_params())
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.request_finished(request, []) == (False, None)
    assert scheduler.build_connector_meta(None).is_empty()
    allowed = _decode_scheduler(allowed_prefill_hosts="10.0.0.0/24")
    assert allowed.get_num_new_matched_tokens(_decode_request(_valid_params()), 0)[1]


def test_allowlist_entries_are_checked_at_start_up():
    with pytest.raises(ValueError, match="allowed_prefill_hosts entry 'a b'"):
        LLMDConnectorConfig.from_extra_config({"allowed_prefill_hosts": "10.0.0.1,a b"})
