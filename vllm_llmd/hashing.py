"""vLLM-compatible prefix block hashes, shared by our connector and our router.

vLLM names every full block of a request by a hash chain (`v1/core/kv_cache_utils.py`):

    h_0 = H((NONE_HASH, tuple(tokens[0:B]),  extra_keys_0))
    h_i = H((h_{i-1},   tuple(tokens[iB:(i+1)B]), extra_keys_i))
    NONE_HASH = H(seed)

where H is the engine's `--prefix-caching-hash-algo` and `extra_keys_i` is a tuple of tagged keys
or None. KV events publish each digest in its int form, `to_event_hash(h)` (the last 8 bytes),
but the chain itself always runs on full digests.

One spelling of a block hash everywhere we print one (logs, the debug state file, the events
watcher, the router), so that one can be searched for in the others:

- `hash_hex(h)`, the full spelling: lowercase hex of every byte of a digest; an event int
  (all that is left of a digest on the wire) in 16 hex digits.
- `short_hash(h)`, the short spelling: the event int in 16 hex digits, i.e. the LAST 16 hex
  digits of `hash_hex`. Not the first 16: a KV event carries only the last 8 bytes of a digest
  (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, vLLM's default), so the tail is the part every side
  can print. A short hash is therefore always a suffix of the full one: grep the debug state
  file for the watcher's `first_hash=…`, or the watcher's output for a log line's hash.

    hash_hex(digest)          2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881
    to_event_hash(digest)     154678297519343745 (what the event carries)
    hash_hex(event int)       02258717921a4881
    short_hash(either)        02258717921a4881

Pure Python on purpose: the router image has no vLLM or torch, so nothing here imports them.
cbor2 and xxhash are imported only when an algorithm needs them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

# A full digest: what vLLM chains on and keeps in its prefix cache (32 bytes for sha256).
BlockHash = NewType("BlockHash", bytes)
# A digest as KV events publish it: int.from_bytes(digest, "big") & (2**64 - 1).
EventBlockHash = NewType("EventBlockHash", int)

HASH_ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_HASH_ALGORITHM = "sha256"
# vLLM's seed for NONE_HASH when PYTHONHASHSEED is unset and the algorithm is cryptographic.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_NON_CRYPTO_ALGORITHMS = frozenset({"xxhash", "xxhash_cbor"})
_EVENT_HASH_MASK = (1 << 64) - 1

HashFunction = Callable[[Any], bytes]


# ---- hash functions (vllm/utils/hashing.py) ---------------------------------------------------


def _pickle(obj: Any) -> bytes:
    # Pickle only feeds a local digest, exactly as vLLM does; it never crosses a wire.
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: Any) -> bytes:
    try:
        import cbor2
    except ImportError:
        raise ModuleNotFoundError(
            "the sha256_cbor/xxhash_cbor prefix-caching hash needs cbor2: pip install cbor2"
        ) from None
    return cbor2.dumps(obj, canonical=True)


def _xxh3_128(data: bytes) -> bytes:
    try:
        import xxhash
    except ImportError:
        raise ModuleNotFoundError(
            "the xxhash/xxhash_cbor prefix-caching hash needs the xxhash package "
            "(the engine uses it too): pip install xxhash"
        ) from None
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest


def sha256(obj: Any) -> bytes:
    """vLLM's `sha256`: SHA-256 of the pickled object."""
    return hashlib.sha256(_pickle(obj)).digest()


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's `sha256_cbor`: SHA-256 of the canonical CBOR encoding (tuples become arrays)."""
    return hashlib.sha256(_cbor(obj)).digest()


def xxhash(obj: Any) -> bytes:
    """vLLM's `xxhash`: XXH3-128 of the pickled object."""
    return _xxh3_128(_pickle(obj))


def xxhash_cbor(obj: Any) -> bytes:
    """vLLM's `xxhash_cbor`: XXH3-128 of the canonical CBOR encoding."""
    return _xxh3_128(_cbor(obj))


_HASH_FUNCTIONS: dict[str, HashFunction] = {
    "sha256": sha256,
    "sha256_cbor": sha256_cbor,
    "xxhash": xxhash,
    "xxhash_cbor": xxhash_cbor,
}


def get_hash_function(algorithm: str) -> HashFunction:
    """The hash function vLLM runs for `--prefix-caching-hash-algo ALGORITHM`."""
    try:
        return _HASH_FUNCTIONS[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown prefix-caching hash algorithm {algorithm!r}; choose one of {HASH_ALGORITHMS}"
        ) from None


# ---- NONE_HASH --------------------------------------------------------------------------------


def resolve_none_hash_seed(
    algorithm: str, seed: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The seed an engine derived NONE_HASH from: `seed`, $PYTHONHASHSEED, or vLLM's default.

    xxhash variants have no default: vLLM then draws a random seed per process (a predictable
    seed would let an attacker precompute colliding blocks), so nobody outside that process
    can reproduce its hashes.
    """
    get_hash_function(algorithm)  # validate the name first
    if seed is None:
        seed = (os.environ if environ is None else environ).get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    if algorithm in _NON_CRYPTO_ALGORITHMS:
        raise ValueError(
            f"{algorithm} block hashes need an explicit seed: without PYTHONHASHSEED each vLLM "
            "process seeds NONE_HASH with random bytes, so its hashes cannot be reproduced. Set "
            "PYTHONHASHSEED to one value on every engine and pass it here (or use sha256)."
        )
    return DEFAULT_NONE_HASH_SEED


def none_hash(algorithm: str = DEFAULT_HASH_ALGORITHM, seed: str | None = None) -> BlockHash:
    """vLLM's NONE_HASH (the parent of every first block) for this algorithm and seed."""
    return BlockHash(get_hash_function(algorithm)(resolve_none_hash_seed(algorithm, seed)))


# ---- extra keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAKey:
    """The adapter a request ran with; vLLM hashes ("lora", name, path) into every block."""

    name: str
    path: str = ""


def block_extra_keys(
    block_index: int, *, lora: LoRAKey | None = None, cache_salt: str | None = None
) -> tuple[Any, ...] | None:
    """The tagged extra keys of one block, in vLLM's order (LoRA, then salt); None if none.

    Multimodal and prompt-embeds keys are not supported: they need the request's inputs,
    which a router does not have.
    """
    keys: list[tuple[str, ...]] = []
    if lora is not None:
        keys.append(("lora", lora.name, lora.path))
    if cache_salt and block_index == 0:  # vLLM salts the first block only; "" means no salt
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


def lookahead_extra_keys(
    extra_keys: tuple[Any, ...] | None, lookahead_token_ids: Sequence[int]
) -> tuple[Any, ...]:
    """vLLM 0.33's lookahead form `(E, *next_tokens)` (EAGLE/MTP engines without a connector)."""
    return (extra_keys, *(int(t) for t in lookahead_token_ids))


# ---- the chain --------------------------------------------------------------------------------


def to_event_hash(digest: bytes) -> EventBlockHash:
    """A digest in the int form KV events publish (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1)."""
    return EventBlockHash(int.from_bytes(digest, "big") & _EVENT_HASH_MASK)


def event_hash_from_wire(value: int | bytes) -> EventBlockHash:
    """An event's hash as an EventBlockHash, whether the engine sent the int or the raw digest."""
    if isinstance(value, bool) or not isinstance(value, (int, bytes)):
        raise TypeError(f"a block hash is an int or bytes, not {type(value).__name__}")
    if isinstance(value, bytes):
        return to_event_hash(value)
    if not 0 <= value <= _EVENT_HASH_MASK:
        raise ValueError(f"event block hash {value} is not an unsigned 64-bit int")
    return EventBlockHash(value)


def hash_hex(block_hash: int | bytes) -> str:
    """The full spelling of a block hash: a digest's bytes in lowercase hex; an event int
    (the last 8 bytes of its digest) in 16 hex digits, which end every digest's full spelling."""
    if isinstance(block_hash, bytes):
        return block_hash.hex()
    return f"{event_hash_from_wire(block_hash):016x}"


def short_hash(block_hash: int | bytes) -> str:
    """The short spelling of a block hash: its event int in 16 lowercase hex digits.

    The same for a digest and for the int an event carries for it, and the last 16 digits of
    `hash_hex` (for digests of 8 bytes or more): see the module docstring.
    """
    return f"{event_hash_from_wire(block_hash):016x}"


@dataclass(frozen=True)
class PrefixHasher:
    """vLLM's block hash chain for one engine's settings (block size, algorithm, seed).

    `block_size` is the engine's hash block size (its block size; 128 by default on CPU).
    `seed` defaults to $PYTHONHASHSEED, then to vLLM's fixed seed (sha256 variants only).
    """

    block_size: int
    algorithm: str = DEFAULT_HASH_ALGORITHM
    seed: str | None = None
    none_hash: BlockHash = field(init=False, repr=False)
    _hash: HashFunction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        seed = resolve_none_hash_seed(self.algorithm, self.seed)
        hash_fn = get_hash_function(self.algorithm)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "_hash", hash_fn)
        object.__setattr__(self, "none_hash", BlockHash(hash_fn(seed)))

    def hash_block(
        self,
        parent: BlockHash | None,
        token_ids: Iterable[int],
        extra_keys: tuple[Any, ...] | None = None,
    ) -> BlockHash:
        """One link of the chain: vLLM's `hash_block_tokens` (parent None: first block)."""
        # int(): numpy ints pickle differently from the Python ints vLLM hashes.
        tokens = tuple(int(t) for t in token_ids)
        return BlockHash(self._hash((bytes(parent or self.none_hash), tokens, extra_keys)))

    def block_hashes(
        self,
        token_ids: Sequence[int],
        *,
        lora: LoRAKey | None = None,
        cache_salt: str | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[BlockHash]:
        """The hashes of every full block of a token sequence (prompt, then generated tokens).

        `num_lookahead_tokens` > 0 gives vLLM 0.33's lookahead hashes: a block is hashed only
        once that many tokens follow it, and they join its extra keys.
        """
        if num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens must be >= 0, got {num_lookahead_tokens}")
        size = self.block_size
        num_blocks = max(0, (len(token_ids) - num_lookahead_tokens) // size)
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for index in range(num_blocks):
            start, end = index * size, (index + 1) * size
            extra = block_extra_keys(index, lora=lora, cache_salt=cache_salt)
            if num_lookahead_tokens:
                extra = lookahead_extra_keys(extra, token_ids[end : end + num_lookahead_tokens])
            parent = self.hash_block(parent, token_ids[start:end], extra)
            hashes.append(parent)
        return hashes

    def event_hashes(self, token_ids: Sequence[int], **options: Any) -> list[EventBlockHash]:
        """`block_hashes` in the int form KV events carry (same options)."""
        return [to_event_hash(h) for h in self.block_hashes(token_ids, **options)]
