"""Fuzzing the disk tier's block files (issue 22): `read` and `scan` of files whose bytes,
header fields or names are fuzzed.

`read` returns the payload that was written, or raises `CorruptBlockFileError` and deletes
the file; `scan` never raises, returns only files whose headers are valid, deletes the invalid
files of its rank and leaves other names alone; a header length claiming 2^40 bytes is refused
before anything is allocated. Profiles and shared strategies: fuzz_settings.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from disk_harness import make_block, make_key, make_store
from fuzz_settings import NASTY, examples, mangled, mutated, values
from hypothesis import example, given
from hypothesis import strategies as st
from test_offload_disk_scan import header_of, write_raw

from vllm_llmd.offload.disk_scan import read_header
from vllm_llmd.offload.disk_store import CorruptBlockFileError, ScannedBlockFile

KEY = make_key(0)
OTHER_KEY = make_key(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for all examples (each rewrites the files it fuzzes)."""
    return make_store(tmp_path_factory.mktemp("fuzz-disk"))


@pytest.fixture(scope="module")
def good_file(store) -> bytes:
    """The bytes of a valid block file of KEY."""
    store.write(KEY, make_block(store.block_bytes, seed=0), info="block 0")
    data = store.path_for(KEY).read_bytes()
    store.delete(KEY)
    return data


def _valid_header(store) -> tuple[dict, bytes]:
    """The parsed header and the payload of a valid block file of KEY (not left on disk)."""
    store.write(KEY, make_block(store.block_bytes, seed=0), info="block 0")
    try:
        return header_of(store.path_for(KEY))
    finally:
        store.delete(KEY)


def _header_edits() -> st.SearchStrategy:
    """A valid header with one field replaced, deleted or added (its JSON re-encoded)."""
    with tempfile.TemporaryDirectory() as root:
        header, _ = _valid_header(make_store(Path(root)))
    return mutated(header, st.one_of(values(), NASTY))


def _fresh_shard(store) -> Path:
    """KEY's shard folder, emptied."""
    shard = store.path_for(KEY).parent
    shard.mkdir(exist_ok=True)
    for entry in shard.iterdir():
        entry.unlink()
    return shard


def _check_read(store, expected: torch.Tensor) -> None:
    """read() gives exactly what was written, or CorruptBlockFileError and the file is gone."""
    path = store.path_for(KEY)
    try:
        data = store.read(KEY)
    except CorruptBlockFileError:
        assert not path.exists()
        return
    assert torch.equal(data, expected)


@examples(400)
@given(st.data())
@example(data=None)
def test_read_of_a_mangled_file_is_the_block_or_a_corrupt_block_error(store, good_file, data):
    content = good_file if data is None else data.draw(mangled(good_file), label="content")
    _fresh_shard(store)
    store.path_for(KEY).write_bytes(content)
    _check_read(store, make_block(store.block_bytes, seed=0))


@examples(300)
@given(st.data())
@example(data=None)
def test_the_start_up_check_of_a_mangled_file_agrees_with_read(store, good_file, data):
    """list_blocks keeps any file by its name; check_header then returns its info, or deletes
    it and says why; a file it passed still has its payload checked by read."""
    content = good_file if data is None else data.draw(mangled(good_file), label="content")
    _fresh_shard(store)
    path = store.path_for(KEY)
    path.write_bytes(content)
    assert [b.key for b in store.list_blocks()] == [KEY]
    try:
        info = store.check_header(KEY)
    except CorruptBlockFileError:
        assert not path.exists()
        return
    assert isinstance(info, str) and path.exists()
    _check_read(store, make_block(store.block_bytes, seed=0))


@examples(400)
@given(_header_edits())
def test_read_and_scan_of_an_edited_header(store, header):
    _, payload = _valid_header(store)
    _fresh_shard(store)
    path = store.path_for(KEY)
    write_raw(path, header, payload)
    scanned = store.scan()
    assert all(isinstance(s, ScannedBlockFile) for s in scanned)
    assert [s.key for s in scanned] in ([], [KEY])
    if not scanned:
        assert not path.exists()
        return
    assert isinstance(scanned[0].info, str)
    _check_read(store, make_block(store.block_bytes, seed=0))
    store.delete(KEY)


NAMES = st.one_of(
    st.sampled_from(
        [
            f"{KEY.hex()}-r0.safetensors",
            f"{KEY.hex()}-r1.safetensors",
            f"{OTHER_KEY.hex()}-r0.safetensors",  # in KEY's shard: the wrong folder
            f"{KEY.hex()[:3]}-r0.safetensors",  # odd hex length
            f".{KEY.hex()}-r0.abc.tmp",
            f"{KEY.hex().upper()}-r0.safetensors",
            "-r0.safetensors",
        ]
    ),
    st.text(st.characters(codec="ascii", exclude_characters="/\x00"), min_size=1, max_size=30),
)


@examples(200)
@given(st.lists(st.tuples(NAMES, st.binary(max_size=300)), max_size=5), st.data())
def test_scan_of_fuzzed_files_never_raises_and_keeps_only_valid_ones(store, files, data):
    """Files with fuzzed names and bytes next to a valid one: the valid one is found; each
    invalid file with this rank's block name is deleted; other names are left alone."""
    shard = _fresh_shard(store)
    good = store.path_for(OTHER_KEY)
    store.write(OTHER_KEY, make_block(store.block_bytes, seed=1))
    written = {}
    for name, content in files:
        if name in (".", "..") or (shard / name) == good:
            continue
        (shard / name).write_bytes(content)
        written[name] = content
    if data.draw(st.booleans(), label="mangle the good file too"):
        good.write_bytes(data.draw(mangled(good.read_bytes()), label="good file"))
    listed = {b.key for b in store.list_blocks()}  # by name: whatever the bytes
    assert OTHER_KEY in listed and listed <= {KEY, OTHER_KEY}
    scanned = store.scan()
    assert len({s.key for s in scanned}) == len(scanned)
    for block in scanned:
        assert block.key in (KEY, OTHER_KEY)
    ours = f"{KEY.hex()}-r0.safetensors"
    for name in written:
        if name.endswith("-r0.safetensors") and name != ours:
            continue  # ours but misplaced or misspelled: deleted or left alone, both fine
        if name == ours:
            assert (shard / name).exists() == (KEY in {s.key for s in scanned})
        elif not name.startswith("."):
            assert (shard / name).exists(), f"{name} is not ours and must be left alone"
    store.delete(OTHER_KEY)


@pytest.mark.parametrize("claimed", [1 << 40, (1 << 64) - 1, (1 << 16) + 1])
def test_a_header_length_past_the_bound_is_refused_before_allocation(tmp_path, claimed):
    store = make_store(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir()
    path.write_bytes(claimed.to_bytes(8, "little") + b"{}" + bytes(1000))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptBlockFileError, match=f"header length {claimed}"):
            store.read(KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10
    assert not path.exists()


def test_read_header_of_a_json_header_claiming_a_huge_tensor(tmp_path):
    """A header whose tensor entry claims 2^40 bytes: refused by validation, nothing read."""
    store = make_store(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir()
    header, payload = _valid_header(store)
    header["kv"] = {"dtype": "U8", "shape": [1 << 40], "data_offsets": [0, 1 << 40]}
    write_raw(path, header, payload)
    with open(path, "rb") as f:
        length, parsed = read_header(f.fileno(), os.fstat(f.fileno()).st_size)
    assert parsed == json.loads(json.dumps(header)) and length > 0
    tracemalloc.start()
    try:
        with pytest.raises(CorruptBlockFileError, match="expected only"):
            store.read(KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10
