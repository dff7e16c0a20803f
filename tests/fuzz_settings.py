"""Hypothesis profiles of the fuzz tests (tests/test_fuzz_*.py), which import this module.

- "ci" (the default): derandomized, so every run tries the same inputs; few enough examples
  that all fuzz tests together take a few minutes on a 2-core box. No example database: what
  a run finds is kept as explicit `@example`s in the test files (the corpus), not in a folder.
- "deep" (`VLLM_LLMD_FUZZ=deep`): random, many more examples, for longer local runs; what it
  finds goes into the test files as `@example`s too.

A test scales its example count with `examples(n)`: n under "ci", 20 * n under "deep".
Below the profiles: strategies the fuzz tests share (hostile values, one-field mutations of a
valid message, byte-level mangling).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("VLLM_LLMD_FUZZ", "ci")
_SCALE = {"ci": 1, "deep": 20}

# generated inputs may be large (huge lengths, long byte strings); the machine is shared
_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=5000,  # ms per example: far above any decoder's time (on a loaded box), below a hang
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "deep",
    derandomize=False,
    database=None,
    deadline=5000,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
if PROFILE not in _SCALE:
    raise ValueError(f"VLLM_LLMD_FUZZ={PROFILE!r}: one of {sorted(_SCALE)}")
settings.load_profile(PROFILE)


def examples(n: int) -> settings:
    """@settings of a fuzz test: n examples under the "ci" profile, more under "deep"."""
    return settings(max_examples=n * _SCALE[PROFILE])


# ---- strategies the fuzz tests share ---------------------------------------------------------

# values a hostile peer likes: bounds, their neighbours, absurd sizes, wrong types
NASTY = st.one_of(
    st.sampled_from(
        [-1, 0, 1, 2**31, 2**32, 2**40, 2**63 - 1, 2**64 - 1, -(2**63), "", "\x00",
         float("nan"), float("inf"), -0.0, True, False, None, [], {}, [[[[[]]]]]]
    ),
    st.builds(str.__mul__, st.just("x"), st.just(5000)),
    st.builds(list.__mul__, st.just([0]), st.just(1000)),
)  # fmt: skip
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
MSGPACK_SCALARS = st.one_of(JSON_SCALARS, st.floats(), st.binary(max_size=20))


def values(scalars: st.SearchStrategy[Any] = JSON_SCALARS) -> st.SearchStrategy[Any]:
    """Arbitrary nested lists and string-keyed maps of `scalars` (and NASTY ones)."""
    return st.recursive(
        st.one_of(scalars, NASTY),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )


def encodable(value: object) -> bytes | None:
    """value as msgpack, or None where it is none (an int past 64 bits)."""
    try:
        return msgspec.msgpack.encode(value)
    except (OverflowError, TypeError):
        return None


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a part of nested dicts and lists (the root included)."""
    found = [path]
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            found += _paths(child, (*path, key))
    return found


@st.composite
def mutated(draw: Callable[..., Any], valid: Any, leaf: st.SearchStrategy[Any]) -> Any:
    """`valid` (built-in dicts and lists) with one part replaced by a `leaf`, deleted, or
    joined by an extra key or item; or unchanged."""
    value = copy.deepcopy(valid)
    path = draw(st.sampled_from(_paths(value)))
    op = draw(st.sampled_from(["replace", "delete", "add", "keep"]))
    if op == "keep":
        return value
    if not path:
        return draw(leaf) if op == "replace" else value
    *parents, last = path
    parent = value
    for key in parents:
        parent = parent[key]
    if op == "replace":
        parent[last] = draw(leaf)
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = draw(leaf)
    else:
        parent.append(draw(leaf))
    return value


@st.composite
def mangled(draw: Callable[..., Any], data: bytes) -> bytes:
    """`data` truncated, extended, with a byte changed, or with bytes spliced in."""
    op = draw(st.sampled_from(["truncate", "extend", "flip", "splice", "keep"]))
    at = draw(st.integers(0, len(data)))
    if op == "truncate":
        return data[:at]
    if op == "extend":
        return data + draw(st.binary(min_size=1, max_size=64))
    if op == "flip" and at < len(data):
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if op == "splice":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    return data
