"""Fuzzing the shared tier's replies (issue 22): what an LMCache server answers a lookup, as
the scheduler half reads it (the fake client of test_shared_tier_scheduler stands in for the
server; the scheduler half and vLLM's `Request` are real).

A lookup answer is a chunk count: the scheduler offers at most the prompt's full chunks, in
whole chunks, or nothing. Answers that are no chunk count, and a server that answers "not
yet" forever, are misses (both found by this file: the first reached vLLM's scheduler as an
exception, the second held the request forever). Profiles: fuzz_settings.py.
"""

from __future__ import annotations

import pytest
from fuzz_settings import examples
from hypothesis import example, given
from hypothesis import strategies as st
from shared_tier_harness import CHUNK
from test_shared_tier_scheduler import _shared_scheduler, _vllm_request

PROMPT_TOKENS = 3 * CHUNK + 40


def _matched(answer: object, asks: int = 5) -> list[tuple[int | None, bool]]:
    """get_num_new_matched_tokens, asked `asks` times, against a server answering `answer`."""
    scheduler, _, _ = _shared_scheduler(hit_chunks=answer)
    request = _vllm_request(PROMPT_TOKENS)
    return [scheduler.get_num_new_matched_tokens(request, 0) for _ in range(asks)]


@pytest.fixture(scope="module", autouse=True)
def _warm_up() -> None:
    """The first scheduler imports vLLM (seconds): not in an example's deadline."""
    _matched(1, asks=1)


@examples(40)
@given(st.one_of(st.integers(-(2**64), 2**64), st.booleans()))
@example(0)
@example(10**30)
def test_a_chunk_count_answer_offers_whole_chunks_of_the_prompt(answer):
    *_, (tokens, load) = _matched(answer)
    assert tokens is not None and 0 <= tokens <= PROMPT_TOKENS // CHUNK * CHUNK
    assert tokens % CHUNK == 0 and load == (tokens > 0)


@pytest.mark.parametrize("answer", ["x", float("inf"), [1], {"hit": 1}, b"\x01"])
def test_an_answer_that_is_no_chunk_count_is_a_miss(answer):
    *_, (tokens, load) = _matched(answer)
    assert (tokens, load) == (0, False)


def test_a_server_that_never_finishes_a_lookup_is_a_miss_after_its_timeout():
    scheduler, _, client = _shared_scheduler(hit_chunks=None)
    request = _vllm_request(PROMPT_TOKENS)
    assert scheduler.get_num_new_matched_tokens(request, 0)[0] is None
    lookup = scheduler.state_of(request.request_id).shared_lookup
    lookup.sent_at -= client.timeout_s + 1  # sent longer ago than the client's timeout
    answers = [scheduler.get_num_new_matched_tokens(request, 0) for _ in range(3)]
    assert answers[-1] == (0, False)
