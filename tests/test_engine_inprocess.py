"""The in-process engine fixture: LLMDConnector's worker half is reachable directly."""

from __future__ import annotations

from vllm_llmd.devtools.model_maker import sample_text


def test_worker_half_registered_the_kv_cache(llm_engine_factory, tiny_model):
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    llm = llm_engine_factory(
        tiny_model,
        kv_transfer_config=KVTransferConfig(kv_connector="LLMDConnector", kv_role="kv_both"),
    )
    outputs = llm.generate(
        [sample_text(200, seed=1)], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    )
    assert len(outputs[0].outputs[0].token_ids) == 5

    connector = get_kv_transfer_group()  # the worker-role instance lives in this process
    registration = connector.worker.registration
    assert registration is not None and registration.num_blocks > 0
    assert len(registration.layer_names) == 2
