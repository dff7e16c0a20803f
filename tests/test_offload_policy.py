"""Eviction policies: LRU order, pinned keys skipped, misuse and unknown names rejected."""

from __future__ import annotations

import pytest

from vllm_llmd.offload.policy import CachePolicy, LRUPolicy, make_policy


def _keys(n: int) -> list[bytes]:
    return [bytes([i]) * 32 for i in range(n)]


def test_lru_evicts_least_recently_used_first():
    policy = make_policy("lru")
    a, b, c = _keys(3)
    for key in (a, b, c):
        policy.insert(key)
    assert policy.choose_victim(lambda key: True) == a
    policy.touch(a)  # a hit: a becomes the most recent
    assert policy.choose_victim(lambda key: True) == b
    policy.remove(b)
    assert policy.choose_victim(lambda key: True) == c
    assert len(policy) == 2 and a in policy and b not in policy


def test_choose_victim_does_not_remove_the_key():
    policy = LRUPolicy()
    (a,) = _keys(1)
    policy.insert(a)
    assert policy.choose_victim(lambda key: True) == a
    assert a in policy and len(policy) == 1


def test_lru_skips_pinned_keys():
    policy = LRUPolicy()
    a, b, c = _keys(3)
    for key in (a, b, c):
        policy.insert(key)
    pinned = {a, b}
    assert policy.choose_victim(lambda key: key not in pinned) == c
    pinned.add(c)
    assert policy.choose_victim(lambda key: key not in pinned) is None
    pinned.clear()  # unpinning does not change recency: a is still the oldest
    assert policy.choose_victim(lambda key: key not in pinned) == a


def test_empty_policy_has_no_victim():
    assert make_policy("lru").choose_victim(lambda key: True) is None


def test_misuse_raises_key_error():
    policy = LRUPolicy()
    a, b = _keys(2)
    policy.insert(a)
    with pytest.raises(KeyError):
        policy.insert(a)
    with pytest.raises(KeyError):
        policy.touch(b)
    with pytest.raises(KeyError):
        policy.remove(b)


def test_make_policy_returns_fresh_policies():
    first, second = make_policy("lru"), make_policy("lru")
    assert isinstance(first, CachePolicy) and first is not second
    first.insert(b"k")
    assert len(second) == 0


def test_unknown_policy_name_lists_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown offload cache policy 'arc'.*known policies: lru"
    ):
        make_policy("arc")
