"""The scheduler half's prefill-side hand-off, driven with real vLLM Request objects: a request
that ends normally holds its blocks for the decode side; an aborted one holds nothing."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.v1.request import Request, RequestStatus

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import LLMDHandshake
from vllm_llmd.connector.scheduler import LLMDConnectorScheduler
from vllm_llmd.transfer.messages import KVLayoutFingerprint
from vllm_llmd.transfer.params import RemotePrefillParams

BLOCK = 32
FINGERPRINT = KVLayoutFingerprint(
    model="m",
    dtype="float32",
    num_layers=2,
    num_kv_heads=2,
    head_size=16,
    block_size=BLOCK,
    layout="LBHNC",
    tensor_parallel_size=1,
    page_bytes=4096,
)


def _prefill_scheduler() -> LLMDConnectorScheduler:
    scheduler = LLMDConnectorScheduler(
        LLMDConnectorConfig(), "engine-p", FINGERPRINT, is_producer=True, is_consumer=False
    )
    scheduler.set_worker_handshakes({0: LLMDHandshake(0, 5701)})
    return scheduler


def _finished_request(status: RequestStatus, num_tokens: int = 3 * BLOCK + 5) -> Request:
    params = SamplingParams(
        max_tokens=1, extra_args={"kv_transfer_params": {"do_remote_decode": True}}
    )
    request = Request("req-1", list(range(num_tokens)), params, None)
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
