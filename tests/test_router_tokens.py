"""The router's tokens, block hashes and load readings against a real `vllm serve`.

One tiny-model server is the reference (its tokenizer adds BOS, so add_special_tokens shows;
block size 32; KV events on; request chat templates trusted): its /tokenize for completions
and chat, the BlockStored hashes it publishes for a chat request, its /metrics for load and
cache config.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import aiohttp
import pytest

from vllm_llmd.devtools.client import post_json
from vllm_llmd.devtools.model_maker import sample_text
from vllm_llmd.devtools.server import VLLMServerConfig, event_endpoints, free_port, kv_events_config
from vllm_llmd.events.model import BlockStored
from vllm_llmd.events.subscriber import Subscriber
from vllm_llmd.events.updates import ReceivedBatch
from vllm_llmd.router.load import PodLoad, PodLoadError, pod_load_from_metrics, scrape_pod_load
from vllm_llmd.router.tokens import (
    PROBE_MESSAGES,
    TokenProcessor,
    UnsupportedRequestError,
    detect_content_format,
    normalize_messages,
)

BLOCK = 32  # the CPU attention backend needs a multiple of 32
# loops over message content: vLLM hands it {"type": "text"} parts ("openai" format)
OPENAI_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}<{{ part['text'] }}>{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def add_bos(folder) -> int:
    """Make the folder's tokenizer prepend BOS when asked for special tokens; returns its id."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    return bos


@pytest.fixture(scope="module")
def bos_model(tiny_model, tmp_path_factory):
    """The tiny model with a BOS-adding tokenizer, so add_special_tokens makes a difference."""
    folder = tmp_path_factory.mktemp("tiny-bos")
    for path in tiny_model.iterdir():
        shutil.copy(path, folder / path.name)
    add_bos(folder)
    return folder


@pytest.fixture(scope="module")
def pod(bos_model, vllm_servers):
    config = VLLMServerConfig(
        model=bos_model,
        served_model_name="tiny-bos",
        block_size=BLOCK,
        kv_events_config=kv_events_config(),
        extra_args=["--trust-request-chat-template"],
    )
    server = vllm_servers.shared("router-tokens", config)
    server.events = event_endpoints(config)
    return server


@pytest.fixture(scope="module")
def processor(bos_model):
    return TokenProcessor(bos_model, BLOCK)


def pod_tokens(pod, **body) -> list[int]:
    return post_json(pod.url + "/tokenize", {"model": pod.model_name, **body})["tokens"]


# ---- without a server ---------------------------------------------------------------------


def test_requests_it_cannot_reproduce_are_refused(processor, tmp_path):
    with pytest.raises(UnsupportedRequestError, match="batched"):
        processor.tokenize_request("/v1/completions", {"prompt": ["a", "b"]})
    with pytest.raises(UnsupportedRequestError, match="prompt_embeds"):
        processor.tokenize_request("/v1/completions", {"prompt_embeds": "AAAA"})
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(UnsupportedRequestError, match="'image_url' is not text"):
        processor.tokenize_chat([{"role": "user", "content": [image]}])
    with pytest.raises(UnsupportedRequestError, match="cannot tokenize the request: KeyError"):
        processor.tokenize_request("/v1/chat/completions", {"messages": [{"content": "x"}]})
    raising = "{{ raise_exception('no system turns') }}"
    with pytest.raises(UnsupportedRequestError, match="no system turns"):
        processor.tokenize_request(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "chat_template": raising},
        )
    with pytest.raises(UnsupportedRequestError, match="no tokenization rule"):
        processor.tokenize_request("/v1/embeddings", {"input": "x"})
    with pytest.raises(FileNotFoundError, match="no hub access"):
        TokenProcessor(tmp_path / "nothing", BLOCK)


def test_a_model_id_resolves_to_its_copy_in_the_hugging_face_cache(
    tiny_model, tmp_path, monkeypatch
):
    """Users pass `--tokenizer` what they pass `vllm serve`: a hub id. Resolved to the local
    cache's snapshot (HF_HUB_CACHE layout), never downloaded."""
    from huggingface_hub import constants

    revision = "0" * 40
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in tiny_model.iterdir():
        shutil.copy(path, snapshot / path.name)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    from_id = TokenProcessor("acme/tiny", BLOCK)
    from_folder = TokenProcessor(tiny_model, BLOCK)
    text = sample_text(30, seed=5)
    assert from_id.tokenize_request("/v1/completions", {"prompt": text}) == (
        from_folder.tokenize_request("/v1/completions", {"prompt": text})
    )
    with pytest.raises(FileNotFoundError, match="huggingface-cli download acme/other"):
        TokenProcessor("acme/other", BLOCK)  # not in the cache: no download


def test_request_bodies_are_dispatched_by_endpoint(processor):
    text = sample_text(40, seed=3)
    single = processor.tokenize_request("/v1/completions", {"prompt": [text]})
    assert single == processor.tokenize_completion(text)
    ids = list(range(40))
    assert processor.tokenize_request("/v1/completions", {"prompt": ids}).token_ids == ids
    salted = processor.tokenize_request("/v1/completions", {"prompt": ids, "cache_salt": "s"})
    assert salted.block_hashes[0] != single.block_hashes[0]  # the salt enters block 0
    # P/D decode reuse: the prefill's ids win over re-rendering the messages
    body = {"messages": [{"role": "user", "content": "x"}]}
    body["kv_transfer_params"] = {"prompt_token_ids": ids}
    assert processor.tokenize_request("/v1/chat/completions", body).token_ids == ids
    assert (
        processor.tokenize_request("/v1/chat/completions", {**body, "echo": True}).token_ids != ids
    )


def test_content_format_detection_agrees_with_vllm(processor):
    from vllm.renderers.hf import _detect_content_format

    macro = (
        "{% macro render(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}"
        "{% for message in messages %}{{ render(message.content) }}{% endfor %}"
    )
    loop_messages = (
        "{% set loop_messages = messages[1:] %}{% for msg in loop_messages %}"
        "{% for item in msg.content | reverse %}{{ item }}{% endfor %}{% endfor %}"
    )
    for template in (processor.tokenizer.chat_template, OPENAI_TEMPLATE, macro, loop_messages):
        assert detect_content_format(template) == _detect_content_format(template, default="string")
    assert detect_content_format(OPENAI_TEMPLATE) == "openai"


def test_text_parts_are_joined_or_kept_as_vllm_does():
    message = {"role": "user", "content": [{"type": "text", "text": "a"}, "b"], "name": "n"}
    assert normalize_messages([message], "string") == [
        {"role": "user", "content": "a\nb", "name": "n"}
    ]
    assert normalize_messages([message], "openai")[0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]
    header = {"role": "system", "content": "x-anthropic-billing-header: cch=1\nBe brief."}
    assert normalize_messages([header], "string")[0]["content"] == "Be brief."


# ---- against the pod ----------------------------------------------------------------------


@pytest.mark.server
def test_completion_tokens_match_the_pod(pod, processor):
    bos = processor.tokenizer.convert_tokens_to_ids("<|bos|>")
    assert pod_tokens(pod, prompt="x")[0] == bos  # add_special_tokens matters on this pod
    for prompt in (sample_text(120, seed=1), " lead space, <|user|> tag\n\ttab é 漢 🦊", "x"):
        for special in (True, False):
            ours = processor.completion_token_ids(prompt, add_special_tokens=special)
            assert ours == pod_tokens(pod, prompt=prompt, add_special_tokens=special)


CONVERSATIONS = {
    "plain": list(PROBE_MESSAGES),
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": sample_text(30, seed=2)},
        {"role": "assistant", "content": None},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
    ],
    "developer": [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "D."},
    ],
}
OPTIONS = {
    "defaults": {},
    "no_generation_prompt": {"add_generation_prompt": False},
    "continue_final": {"add_generation_prompt": False, "continue_final_message": True},
    "special_tokens": {"add_special_tokens": True},  # BOS on top of the template's
    "kwargs_under_fields": {"chat_template_kwargs": {"add_generation_prompt": False}},
    "openai_format_template": {"chat_template": OPENAI_TEMPLATE},
}


@pytest.mark.server
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_chat_tokens_match_the_pod(pod, processor, options):
    for name, messages in CONVERSATIONS.items():
        ours = processor.chat_token_ids(messages, **options)
        assert ours == pod_tokens(pod, messages=messages, **options), name


@pytest.mark.server
def test_chat_block_hashes_are_the_ones_the_pod_publishes(pod, processor):
    body = {
        "model": pod.model_name,
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": sample_text(250, seed=7)},
        ],
        "max_tokens": 2,
        "temperature": 0.0,
    }
    post_json(pod.url + "/v1/chat/completions", body)
    ours = processor.tokenize_request("/v1/chat/completions", body)
    assert ours.num_blocks == len(ours.token_ids) // BLOCK >= 10

    endpoint, replay = pod.events
    published: set[int] = set()
    first_blocks: list[BlockStored] = []
    with Subscriber(endpoint, replay_endpoint=replay, topic="kv") as subscriber:
        deadline = time.monotonic() + 15
        while not set(ours.block_hashes) <= published and time.monotonic() < deadline:
            for update in subscriber.poll(0.2):
                if isinstance(update, ReceivedBatch):
                    for event in update.events:
                        if isinstance(event, BlockStored):
                            published.update(event.block_hashes)
                            if event.parent_block_hash is None:
                                first_blocks.append(event)
    assert set(ours.block_hashes) <= published
    # the router can check any pod's hashing from one prefix-start event
    event = next(e for e in first_blocks if e.block_hashes[0] == ours.block_hashes[0])
    verdict = processor.verify_stored_event(event.token_ids, event.block_hashes, event.block_size)
    assert verdict.ok, verdict.reason
    other_seed = TokenProcessor(processor.model_path, BLOCK, hash_seed="another seed")
    verdict = other_seed.verify_stored_event(event.token_ids, event.block_hashes, BLOCK)
    assert not verdict.ok and "PYTHONHASHSEED" in verdict.reason


def test_settings_not_given_are_taken_from_the_first_pod_that_says_them(processor):
    auto = TokenProcessor(processor.model_path, None, None)
    ids = list(range(100, 100 + 3 * BLOCK))
    assert not auto.settings_known and auto.hash(ids).block_hashes == []  # routed by load
    assert auto.adopt_pod_settings(BLOCK, "sha256") == [
        f"block size {BLOCK}",
        "hash algorithm sha256",
    ]
    assert auto.settings_known and auto.block_size == BLOCK
    assert auto.hash(ids).block_hashes == processor.hash(ids).block_hashes
    assert auto.adopt_pod_settings(64, "xxhash") == []  # later pods are checked, not followed
    assert auto.block_size == BLOCK and auto.hasher.algorithm == "sha256"
    # a pod that says no algorithm (an older vLLM) hashes with vLLM's default
    older = TokenProcessor(processor.model_path, BLOCK, None)
    assert older.adopt_pod_settings(None, None) == ["hash algorithm sha256"]
    # an algorithm the router cannot compute: nothing is taken, the pod will fail its check
    unknown = TokenProcessor(processor.model_path, None, None)
    with pytest.raises(ValueError, match="hash algorithm 'md5'"):
        unknown.adopt_pod_settings(BLOCK, "md5")
    assert not unknown.settings_known and unknown.hash(ids).block_hashes == []
    # given on the command line, nothing is taken
    assert processor.adopt_pod_settings(64, "xxhash") == [] and processor.block_size == BLOCK


@pytest.mark.server
def test_verify_against_pod(pod, processor, tiny_model, tmp_path):
    verdict = asyncio.run(processor.verify_against_pod(pod.url, pod.model_name))
    assert verdict.ok, verdict.reason
    assert (verdict.pod_block_size, verdict.pod_hash_algorithm) == (BLOCK, "sha256")
    # Without --block-size and --hash-algorithm the router takes the pod's and matches.
    auto = TokenProcessor(processor.model_path, None, None)
    verdict = asyncio.run(auto.verify_against_pod(pod.url, pod.model_name))
    assert verdict.ok, verdict.reason
    assert (auto.block_size, auto.hasher.algorithm) == (BLOCK, "sha256")

    wrong_size = TokenProcessor(processor.model_path, 64)
    verdict = asyncio.run(wrong_size.verify_against_pod(pod.url, pod.model_name))
    assert not verdict.ok
    assert verdict.reason == "the pod's block size is 32, the router's 64"

    # the plain tiny tokenizer (no BOS) with a template that differs by one character
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|end|>", "<|end|>\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    verdict = asyncio.run(
        TokenProcessor(tmp_path, BLOCK).verify_against_pod(pod.url, pod.model_name)
    )
    assert not verdict.ok
    assert "completion tokens differ: first at index 0 of router" in verdict.reason
    assert "chat tokens differ" in verdict.reason

    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    verdict = asyncio.run(
        TokenProcessor(tmp_path, BLOCK).verify_against_pod(pod.url, pod.model_name)
    )
    assert "chat tokens differ: the router has no chat template" in verdict.reason

    verdict = asyncio.run(processor.verify_against_pod(f"http://127.0.0.1:{free_port()}", "m"))
    assert not verdict.ok and verdict.reason.startswith("could not probe")


# ---- load ---------------------------------------------------------------------------------


@pytest.mark.server
def test_scrape_pod_load_reads_the_pods_gauges(pod):
    async def scrape():
        async with aiohttp.ClientSession() as session:
            return await scrape_pod_load(session, pod.url, num_in_flight=2)

    load = asyncio.run(scrape())
    assert load == PodLoad(
        num_waiting=0,
        num_running=0,
        kv_usage=load.kv_usage,
        num_in_flight=2,
        kv_blocks=load.kv_blocks,
    )
    assert 0.0 <= load.kv_usage < 0.5  # idle: only what the prefix cache pins, if anything
    assert load.kv_blocks > 0  # its KV cache size, from vllm:cache_config_info


def test_pod_load_sums_engines_and_keeps_the_fullest_kv():
    text = "\n".join(
        [
            "# HELP vllm:num_requests_waiting Number of requests waiting.",
            "# TYPE vllm:num_requests_waiting gauge",
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
            'vllm:num_requests_waiting{engine="1",model_name="m"} 1.0',
            'vllm:num_requests_running{engine="0",model_name="m"} 4.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 3.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5',
            'vllm:request_success_total{engine="0",finished_reason="stop"} 9.0',
        ]
    )
    assert pod_load_from_metrics(text, num_in_flight=1) == PodLoad(3, 7, 0.5, 1)
    with pytest.raises(ValueError, match="no vllm:kv_cache_usage_perc"):
        pod_load_from_metrics(text.replace("kv_cache_usage_perc", "other"))


def test_scrape_pod_load_failures_are_pod_load_errors():
    async def run():
        async def stall(reader, writer):
            await asyncio.sleep(5)
            writer.close()

        async def not_vllm(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
            await writer.drain()
            writer.close()

        errors = []
        async with aiohttp.ClientSession() as session:
            for handler in (stall, not_vllm):
                server = await asyncio.start_server(handler, "127.0.0.1", 0)
                url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
                with pytest.raises(PodLoadError) as info:
                    await scrape_pod_load(session, url, timeout=0.3)
                errors.append(info.value)
                server.close()
            with pytest.raises(PodLoadError) as info:
                await scrape_pod_load(session, f"http://127.0.0.1:{free_port()}", timeout=1)
            errors.append(info.value)
        return errors

    stalled, garbage, refused = asyncio.run(run())
    assert stalled.reason == "no answer within 0.3s"
    assert "not a vLLM /metrics page" in garbage.reason or "invalid" in garbage.reason
    assert "Connect" in refused.reason
    assert str(refused).startswith("cannot read the load of http://127.0.0.1:")


def test_chat_template_flag_renders_chat_requests_with_the_given_template(bos_model, tmp_path):
    # Pods started with `vllm serve --chat-template FILE` render with that file; the router
    # must too (--chat-template), or its prefix hashes name blocks no pod holds.
    from vllm_llmd.router.cli import build_router
    from vllm_llmd.router.config_parse import parse_config

    template = tmp_path / "custom.jinja"
    template.write_text(
        "{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>{% endfor %}"
        "{% if add_generation_prompt %}<<assistant|{% endif %}"
    )
    flags = ["--pod", "http://127.0.0.1:1", "--tokenizer", str(bos_model), "--block-size", "4"]
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    ids = {}
    for name, extra in (("model's", []), ("custom", ["--chat-template", str(template)])):
        router = build_router(parse_config([*flags, *extra], environ={}))
        try:
            assert router.tokens is not None
            ids[name] = router.tokens.tokenize_request("/v1/chat/completions", body).token_ids
            tokenizer = router.tokens.tokenizer
        finally:
            router.close()
    rendered = "<<user|hello there>><<assistant|"
    assert ids["custom"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids["custom"] != ids["model's"]
