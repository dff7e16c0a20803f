"""vllm_llmd.hashing reproduces vLLM's prefix block hashes, bit for bit.

Checked against the reference test vectors and against vLLM's own functions
(`hash_block_tokens`, `init_none_hash`, the request block hasher) on random token lists, with and
without cache salt and LoRA, with vLLM's default seed and with PYTHONHASHSEED.
"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.utils import hashing as vllm_hashing
from vllm.v1.core import kv_cache_utils
from vllm.v1.request import Request

from vllm_llmd.hashing import (
    DEFAULT_NONE_HASH_SEED,
    HASH_ALGORITHMS,
    LoRAKey,
    PrefixHasher,
    block_extra_keys,
    event_hash_from_wire,
    get_hash_function,
    hash_hex,
    lookahead_extra_keys,
    none_hash,
    short_hash,
    to_event_hash,
)

# Algorithms both sides can run here (xxhash is an optional package).
try:
    import xxhash  # noqa: F401

    AVAILABLE = HASH_ALGORITHMS
except ImportError:
    AVAILABLE = ("sha256", "sha256_cbor")


@pytest.fixture
def vllm_none_hash(monkeypatch):
    """Initialise vLLM's NONE_HASH global for an algorithm (and optional PYTHONHASHSEED)."""

    def init(algorithm: str, seed: str | None = None) -> None:
        if seed is None:
            monkeypatch.delenv("PYTHONHASHSEED", raising=False)
        else:
            monkeypatch.setenv("PYTHONHASHSEED", seed)
        kv_cache_utils.init_none_hash(vllm_hashing.get_hash_fn_by_name(algorithm))

    yield init
    # leave vLLM's global as an engine in this process would set it by default
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    kv_cache_utils.init_none_hash(vllm_hashing.sha256)


# ---- reference test vectors (vllm-connector-api.md §5.5) ---------------------------------------


def test_reference_vectors_sha256():
    hasher = PrefixHasher(16, "sha256", seed=DEFAULT_NONE_HASH_SEED)
    assert hasher.none_hash.hex().startswith("066b1e89")
    assert hasher.none_hash.hex().endswith("f0d71198")
    first, second = hasher.block_hashes(list(range(32)))
    assert first.hex().startswith("fe8fa5dd") and first.hex().endswith("1d434798")
    assert to_event_hash(first) == 3262291359910021016
    assert to_event_hash(second) == 7142137847444424233
    lora_hash = hasher.hash_block(None, range(16), (("lora", "my-lora", "/path"),))
    assert to_event_hash(lora_hash) == 7542580522040096778
    assert hasher.event_hashes(list(range(16)), lora=LoRAKey("my-lora", "/path")) == [
        7542580522040096778
    ]


def test_reference_vectors_sha256_cbor():
    hasher = PrefixHasher(16, "sha256_cbor", seed=DEFAULT_NONE_HASH_SEED)
    assert hasher.none_hash.hex().startswith("9bd96a48")
    assert hasher.none_hash.hex().endswith("9581eef0")
    assert hasher.event_hashes(list(range(32))) == [2233398808101521225, 17911472383915781900]


# ---- against vLLM's functions ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", AVAILABLE)
def test_hash_functions_match_vllm(algorithm):
    ours, theirs = get_hash_function(algorithm), vllm_hashing.get_hash_fn_by_name(algorithm)
    for obj in ("vllm-none-hash", (b"\x01" * 32, (1, 2, 3), None), (b"", (), (("a", "b"),))):
        assert ours(obj) == theirs(obj)


@pytest.mark.parametrize("algorithm", ("sha256", "sha256_cbor"))
@pytest.mark.parametrize("seed", (None, "0", "1234"))
def test_none_hash_matches_vllm(vllm_none_hash, algorithm, seed):
    vllm_none_hash(algorithm, seed)
    # ours reads PYTHONHASHSEED from the environment the fixture set, like vLLM does
    assert none_hash(algorithm) == kv_cache_utils.NONE_HASH
    assert PrefixHasher(16, algorithm).none_hash == kv_cache_utils.NONE_HASH


@pytest.mark.parametrize("algorithm", AVAILABLE)
def test_random_chains_match_hash_block_tokens(vllm_none_hash, algorithm):
    seed = "42" if algorithm.startswith("xxhash") else None
    vllm_none_hash(algorithm, seed)
    vllm_fn = vllm_hashing.get_hash_fn_by_name(algorithm)
    rng = random.Random(algorithm)
    for block_size in (16, 32, 128):
        hasher = PrefixHasher(block_size, algorithm, seed=seed)
        for _ in range(5):
            tokens = [rng.randrange(50_000) for _ in range(rng.randrange(0, 5 * block_size))]
            salt = rng.choice((None, "tenant-a"))
            lora = rng.choice((None, LoRAKey("adapter", "/loras/adapter")))
            expected, parent = [], None
            for i in range(len(tokens) // block_size):
                extra = block_extra_keys(i, lora=lora, cache_salt=salt)
                block = tokens[i * block_size : (i + 1) * block_size]
                parent = kv_cache_utils.hash_block_tokens(vllm_fn, parent, block, extra)
                expected.append(parent)
            assert hasher.block_hashes(tokens, lora=lora, cache_salt=salt) == expected


@pytest.mark.parametrize("algorithm", ("sha256", "sha256_cbor"))
@pytest.mark.parametrize("seed", (None, "7"))
def test_request_block_hasher_with_salt_and_lora(vllm_none_hash, algorithm, seed):
    """vLLM builds the extra keys itself here (LoRA on every block, salt on block 0)."""
    vllm_none_hash(algorithm, seed)
    rng = random.Random(f"{algorithm}-{seed}")
    cases = [
        (None, None),
        ("salty", None),
        (None, LoRARequest("sql-lora", 1, "/adapters/sql")),
        ("salty", LoRARequest("sql-lora", 1, "/adapters/sql")),
    ]
    for block_size in (16, 128):
        vllm_hasher = kv_cache_utils.get_request_block_hasher(
            block_size, vllm_hashing.get_hash_fn_by_name(algorithm)
        )
        hasher = PrefixHasher(block_size, algorithm)
        for salt, lora_request in cases:
            tokens = [rng.randrange(32_000) for _ in range(rng.randrange(1, 4 * block_size))]
            request = Request(
                "r",
                tokens,
                SamplingParams(max_tokens=1),
                None,
                lora_request=lora_request,
                cache_salt=salt,
                block_hasher=vllm_hasher,
            )
            lora = LoRAKey(lora_request.lora_name, lora_request.lora_path) if lora_request else None
            ours = hasher.block_hashes(tokens, lora=lora, cache_salt=salt)
            assert ours == request.block_hashes
            assert len(ours) == len(tokens) // block_size


def test_salt_changes_only_through_the_chain():
    hasher = PrefixHasher(16)
    tokens = list(range(48))
    plain, salted = hasher.block_hashes(tokens), hasher.block_hashes(tokens, cache_salt="s")
    assert all(a != b for a, b in zip(plain, salted, strict=True))  # the salt poisons the chain
    assert block_extra_keys(0, cache_salt="s") == (("cache_salt", "s"),)
    assert block_extra_keys(1, cache_salt="s") is None  # but is keyed on block 0 only
    assert hasher.block_hashes(tokens, cache_salt="") == plain  # vLLM treats "" as no salt


def test_event_int_form_matches_vllm():
    digest = PrefixHasher(16).block_hashes(list(range(16)))[0]
    assert to_event_hash(digest) == kv_cache_utils.maybe_convert_block_hash(digest)
    assert event_hash_from_wire(digest) == to_event_hash(digest)  # engines sending raw bytes
    assert event_hash_from_wire(12345) == 12345
    with pytest.raises(ValueError, match="64-bit"):
        event_hash_from_wire(-1)
    with pytest.raises(ValueError, match="64-bit"):
        event_hash_from_wire(1 << 64)
    with pytest.raises(TypeError):
        event_hash_from_wire("12")  # type: ignore[arg-type]


def test_one_spelling_of_a_hash_for_digests_and_event_ints():
    for algorithm in AVAILABLE:
        digest = PrefixHasher(16, algorithm, seed="0").block_hashes(list(range(16)))[0]
        wire = kv_cache_utils.maybe_convert_block_hash(digest)  # what vLLM's events carry
        assert hash_hex(digest) == digest.hex()  # the full spelling: every byte, lowercase
        assert len(hash_hex(digest)) == 2 * len(digest)
        assert hash_hex(wire) == f"{wire:016x}" and len(hash_hex(wire)) == 16
        # the short spelling is the same whichever form a side has, and ends the full one
        assert short_hash(digest) == short_hash(wire) == short_hash(to_event_hash(digest))
        assert hash_hex(digest).endswith(short_hash(digest)) and len(short_hash(digest)) == 16
        assert hash_hex(wire) == short_hash(wire)  # all the event int holds of the digest
    # zero-padded to 16 digits, lowercase
    assert hash_hex(0xAB) == short_hash(0xAB) == "00000000000000ab"
    assert short_hash(bytes(24) + bytes.fromhex("00000000000000ab")) == "00000000000000ab"
    assert hash_hex(b"\x00\xff") == "00ff"
    for wrong in (-1, 1 << 64):
        with pytest.raises(ValueError, match="64-bit"):
            short_hash(wrong)
        with pytest.raises(ValueError, match="64-bit"):
            hash_hex(wrong)
    with pytest.raises(TypeError):
        short_hash("ab")  # type: ignore[arg-type]


def test_lookahead_form(vllm_none_hash):
    """vLLM 0.33 lookahead hashes: (E, *next L tokens) as extra keys, only with L successors."""
    vllm_none_hash("sha256")
    hasher, lookahead = PrefixHasher(16), 2
    tokens = list(range(1000, 1000 + 16 * 3 + 1))  # 3 full blocks; the 3rd lacks 2 successors
    lora = LoRAKey("a", "/a")
    ours = hasher.block_hashes(tokens, lora=lora, num_lookahead_tokens=lookahead)
    assert len(ours) == 2
    expected, parent = [], None
    for i in range(2):
        end = (i + 1) * 16
        extra = ((("lora", "a", "/a"),), *tokens[end : end + lookahead])
        parent = kv_cache_utils.hash_block_tokens(
            vllm_hashing.sha256, parent, tokens[i * 16 : end], extra
        )
        expected.append(parent)
    assert ours == expected
    assert lookahead_extra_keys(None, [5, 6]) == (None, 5, 6)


def test_numpy_tokens_hash_like_python_ints():
    hasher = PrefixHasher(16)
    tokens = list(range(64))
    assert hasher.block_hashes(np.array(tokens, dtype=np.int64)) == hasher.block_hashes(tokens)


def test_xxhash_needs_an_explicit_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    for algorithm in ("xxhash", "xxhash_cbor"):
        with pytest.raises(ValueError, match="PYTHONHASHSEED"):
            PrefixHasher(16, algorithm)


def test_xxhash_missing_module_says_how_to_install():
    if "xxhash" in AVAILABLE:
        pytest.skip("xxhash is installed here")
    with pytest.raises(ModuleNotFoundError, match="pip install xxhash"):
        PrefixHasher(16, "xxhash", seed="1")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown prefix-caching hash algorithm"):
        PrefixHasher(16, "md5")
    with pytest.raises(ValueError, match="block_size"):
        PrefixHasher(0)
    with pytest.raises(ValueError, match="num_lookahead_tokens"):
        PrefixHasher(16).block_hashes([1] * 32, num_lookahead_tokens=-1)


def test_import_is_pure_python():
    # The router image has no vLLM: hashing must not pull it (nor torch, nor lazy extras) in.
    code = (
        "import sys, vllm_llmd.hashing as h; h.PrefixHasher(16).block_hashes(list(range(64)));"
        "heavy = [m for m in ('vllm', 'torch', 'cbor2', 'xxhash') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
