"""vllm_llmd.ops: the cache description, the input checks, the torch path and the mode choice.

The torch path is compared byte for byte with plain indexing (vllm_llmd.ops.layouts) on every
layout; the kernels get the same comparison in test_copy_kernels.py. The tests at the end run
only where CUDA is: kernels against the torch path on the GPU.
"""

from __future__ import annotations

import logging
import zlib

import pytest
import torch

from vllm_llmd.ops import (
    COPY_MODE_ENV,
    PagedKVCache,
    block_copy,
    copy_blocks,
    cuda_copy,
    gather_blocks,
    resolve_mode,
    scatter_blocks,
    torch_copy,
)
from vllm_llmd.ops.layouts import LAYOUTS, KVCacheShape, allocate_kv_caches

SHAPE = KVCacheShape(num_layers=3, num_blocks=9, num_heads=2, block_size=4, content=8)
ODD = KVCacheShape(num_layers=2, num_blocks=7, num_heads=3, block_size=5, content=7)
CASES = [  # (dtype, shape, cache offset bytes, buffer offset bytes)
    (torch.bfloat16, SHAPE, 0, 0),
    (torch.float16, SHAPE, 2, 6),
    (torch.uint8, ODD, 1, 0),
    (torch.uint8, ODD, 3, 3),
]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rng(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def byte_buffer(nbytes, offset=0, device="cpu"):
    return torch.full((offset + nbytes,), 0xEE, dtype=torch.uint8, device=device)[offset:]


def expected_buffer(allocated, ids):
    layers = range(len(allocated.kv_caches))
    return torch.cat([allocated.block_bytes(layer, block) for block in ids for layer in layers])


def storage_after_scatter(reference, ids, src):
    pages = src.view(len(ids), len(reference.kv_caches), -1)
    for i, block in enumerate(ids):
        for layer in range(len(reference.kv_caches)):
            reference.write_block(layer, block, pages[i, layer])
    return reference.storage_bytes()


# --- the description --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,segments,page_bytes,block_stride",
    [  # SHAPE in bf16: one layer's block is 2*4*8*2 = 128 B, one head's run 64 B
        ("LBHNC", 3, 128, 128),
        ("LBNHC", 3, 128, 128),
        ("LHBNC", 6, 64, 64),
        ("BLHNC", 1, 3 * 128, 3 * 128),  # a block's layers are back to back: one segment
        ("BLNHC", 1, 3 * 128, 3 * 128),
        ("BHLNC", 6, 64, 3 * 128),
    ],
)
def test_from_layers_finds_the_segments_of_each_layout(layout, segments, page_bytes, block_stride):
    cache = PagedKVCache.from_layers(allocate_kv_caches(layout, SHAPE).kv_caches)
    assert (cache.num_segments, cache.page_bytes, cache.block_stride) == (
        segments,
        page_bytes,
        block_stride,
    )
    assert cache.block_bytes == 3 * 128
    assert cache.layer_names == ("layers.0", "layers.1", "layers.2")
    assert cache.base_table.tolist() == cache.base_addresses()


def test_from_layers_keeps_shared_kv_layers_once():
    kv_caches = allocate_kv_caches("LBHNC", SHAPE).kv_caches
    kv_caches["layers.3"] = kv_caches["layers.1"]  # cross-layer KV sharing: the same view
    cache = PagedKVCache.from_layers(kv_caches)
    assert cache.layer_names == ("layers.0", "layers.1", "layers.2")


def test_from_layers_accepts_dtype_views():
    kv_caches = allocate_kv_caches("LBHNC", SHAPE, torch.uint8).kv_caches
    as_fp16 = {name: tensor.view(torch.float16) for name, tensor in kv_caches.items()}
    assert PagedKVCache.from_layers(as_fp16).block_bytes == 3 * 64


def half_a_block_later(layer):
    offset = layer.storage_offset() + layer[0].numel() // 2
    return layer.as_strided(layer.shape, layer.stride(), offset)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda kv: kv.update({"layers.1": kv["layers.1"].float()}), "differ in dtype"),
        (lambda kv: kv.update({"layers.1": kv["layers.1"][:5]}), "number of blocks"),
        (lambda kv: kv.update({"layers.1": kv["layers.1"][:, :1]}), "different layouts"),
        (lambda kv: kv.update({"layers.1": half_a_block_later(kv["layers.0"])}), "overlap"),
        (lambda kv: kv.update({"layers.1": [1, 2]}), "not a torch.Tensor"),
        (lambda kv: kv.clear(), "empty"),
    ],
    ids=["dtype", "num-blocks", "page", "overlap", "not-tensor", "empty"],
)
def test_from_layers_rejects_layers_that_are_not_one_cache(change, message):
    kv_caches = allocate_kv_caches("LBHNC", SHAPE).kv_caches
    change(kv_caches)
    with pytest.raises(ValueError, match=message):
        PagedKVCache.from_layers(kv_caches)


def test_from_layers_rejects_overlapping_blocks():
    flat = torch.zeros(100, dtype=torch.uint8)
    overlapping = flat.as_strided((9, 16), (8, 1))  # 16-byte blocks every 8 bytes
    with pytest.raises(ValueError, match="blocks overlap"):
        PagedKVCache.from_layers({"layers.0": overlapping})


# --- the torch path against plain indexing ------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_gather_matches_plain_indexing(layout, case):
    dtype, shape, cache_offset, buffer_offset = case
    generator = rng(layout, case)
    allocated = allocate_kv_caches(
        layout, shape, dtype, offset_bytes=cache_offset, generator=generator
    )
    ids = torch.randint(0, shape.num_blocks, (6,), generator=generator).tolist()
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    out = byte_buffer(cache.buffer_bytes(len(ids)), buffer_offset)

    gather_blocks(cache, ids, out, mode="torch")

    assert torch.equal(out, expected_buffer(allocated, ids))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_scatter_matches_plain_indexing(layout, case):
    dtype, shape, cache_offset, buffer_offset = case
    allocated, reference = (
        allocate_kv_caches(layout, shape, dtype, offset_bytes=cache_offset, generator=rng(case))
        for _ in range(2)
    )
    generator = rng(layout, case, "ids")
    ids = torch.randperm(shape.num_blocks, generator=generator)[:5].tolist()
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    src = byte_buffer(cache.buffer_bytes(len(ids)), buffer_offset)
    src.copy_(torch.randint(0, 256, src.shape, dtype=torch.uint8, generator=generator))

    scatter_blocks(cache, ids, src, mode="torch")

    assert torch.equal(allocated.storage_bytes(), storage_after_scatter(reference, ids, src))


def test_torch_path_with_one_tensor_per_layer_in_any_order():
    # Separate allocations (no single strided view): the per-segment loop.
    layers = [allocate_kv_caches("LBHNC", SHAPE, generator=rng(i)) for i in range(3)]
    kv_caches = {f"l{i}": layers[i].kv_caches["layers.0"] for i in (2, 0, 1)}
    cache = PagedKVCache.from_layers(kv_caches)
    assert torch_copy._views(cache, 8).stacked is None
    ids = [4, 1, 7]
    out = torch.empty(cache.buffer_bytes(len(ids)) // 2, dtype=torch.bfloat16)
    gather_blocks(kv_caches, ids, out, mode="torch")  # the dict itself works too
    expected = torch.cat([layers[i].block_bytes(0, b) for b in ids for i in (2, 0, 1)])
    assert torch.equal(out.view(torch.uint8), expected)

    scatter_blocks(cache, [0, 8, 2], out.flip(0).contiguous(), mode="torch")
    back = torch.empty_like(out)
    gather_blocks(cache, [0, 8, 2], back, mode="torch")
    assert torch.equal(back.view(torch.uint8), out.flip(0).view(torch.uint8))  # NaNs: bytes


def test_round_trip_through_a_buffer_between_two_caches():
    source = allocate_kv_caches("LBHNC", SHAPE, generator=rng("source"))
    target = allocate_kv_caches("LBHNC", SHAPE, generator=rng("target"))
    nbytes = PagedKVCache.from_layers(source.kv_caches).buffer_bytes(3)
    buffer = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    gather_blocks(source.kv_caches, [1, 5, 3], buffer)
    scatter_blocks(target.kv_caches, [8, 0, 2], buffer)
    for src_block, dst_block in ((1, 8), (5, 0), (3, 2)):
        for layer in range(SHAPE.num_layers):
            assert torch.equal(
                target.block_bytes(layer, dst_block), source.block_bytes(layer, src_block)
            )


# --- input checks, before any byte moves -----------------------------------------------


@pytest.fixture
def cache_and_copy():
    allocated = allocate_kv_caches("LBHNC", SHAPE, generator=rng("checks"))
    return allocated, PagedKVCache.from_layers(allocated.kv_caches)


@pytest.mark.parametrize(
    "ids,message",
    [
        ([0, 9], r"block ids \[9\] are out of range"),
        ([-1, 2], r"block ids \[-1\] are out of range"),
        ([[0, 1]], "one list of ids"),
        ([0.0, 1.0], "must be integers"),
    ],
)
@pytest.mark.parametrize("copy", [gather_blocks, scatter_blocks])
def test_bad_block_ids_raise_before_copying(cache_and_copy, copy, ids, message):
    allocated, cache = cache_and_copy
    before = allocated.storage_bytes()
    buffer = byte_buffer(cache.buffer_bytes(2))
    with pytest.raises(ValueError, match=message):
        copy(cache, ids, buffer)
    assert torch.equal(allocated.storage_bytes(), before)
    assert bool((buffer == 0xEE).all())


def test_scatter_rejects_repeated_destinations_gather_allows_them(cache_and_copy):
    allocated, cache = cache_and_copy
    before = allocated.storage_bytes()
    buffer = byte_buffer(cache.buffer_bytes(3))
    with pytest.raises(ValueError, match=r"block ids \[4\] repeat"):
        scatter_blocks(cache, [4, 2, 4], buffer)
    assert torch.equal(allocated.storage_bytes(), before)
    gather_blocks(cache, [4, 2, 4], buffer)
    assert torch.equal(buffer, expected_buffer(allocated, [4, 2, 4]))


@pytest.mark.parametrize(
    "make_buffer,message",
    [
        (lambda n: torch.empty(n + 1, dtype=torch.uint8), "holds .* bytes but 2 blocks take"),
        (lambda n: torch.empty(n // 4, dtype=torch.float32), "has dtype torch.float32"),
        (lambda n: torch.empty(2, n // 2, dtype=torch.uint8).t(), "must be contiguous"),
        (lambda n: "bytes", "must be a torch.Tensor"),
    ],
    ids=["size", "dtype", "strided", "type"],
)
@pytest.mark.parametrize("copy", [gather_blocks, scatter_blocks])
def test_bad_buffers_raise_before_copying(cache_and_copy, copy, make_buffer, message):
    allocated, cache = cache_and_copy
    before = allocated.storage_bytes()
    with pytest.raises(ValueError, match=message):
        copy(cache, [1, 2], make_buffer(cache.buffer_bytes(2)))
    assert torch.equal(allocated.storage_bytes(), before)


def test_no_ids_copy_nothing(cache_and_copy):
    _, cache = cache_and_copy
    gather_blocks(cache, [], torch.empty(0, dtype=torch.uint8))
    scatter_blocks(cache, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8))


# --- the mode ----------------------------------------------------------------------------


def test_mode_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(COPY_MODE_ENV, raising=False)
    assert resolve_mode() == "auto"
    monkeypatch.setenv(COPY_MODE_ENV, "torch")
    assert resolve_mode() == "torch"
    assert resolve_mode("cuda") == "cuda"
    monkeypatch.setenv(COPY_MODE_ENV, "fast")
    with pytest.raises(ValueError, match=f"{COPY_MODE_ENV}='fast' is not a copy mode"):
        resolve_mode()


def test_forced_cuda_mode_says_why_it_cannot_run(cache_and_copy):
    _, cache = cache_and_copy
    with pytest.raises(ValueError, match="mode 'cuda' cannot run: the cache is on cpu"):
        gather_blocks(cache, [1], byte_buffer(cache.buffer_bytes(1)), mode="cuda")


def test_the_path_choice_is_logged_once(cache_and_copy, monkeypatch):
    _, cache = cache_and_copy
    monkeypatch.setattr(block_copy, "_logged", set())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    # on our logger itself: vLLM's logging config may stop "vllm.*" records at "vllm"
    block_copy.logger.addHandler(handler)
    monkeypatch.setattr(block_copy.logger, "disabled", False)
    previous = block_copy.logger.level
    block_copy.logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            gather_blocks(cache, [1], byte_buffer(cache.buffer_bytes(1)), mode="auto")
    finally:
        block_copy.logger.removeHandler(handler)
        block_copy.logger.setLevel(previous)
    messages = [record.getMessage() for record in records]
    assert messages == ["block copies use the torch path: the cache is on cpu"]


def test_a_failed_kernel_build_is_tried_once_per_device(monkeypatch):
    attempts = []

    def failing_build(device):
        attempts.append(device)
        raise RuntimeError("no NVRTC")

    monkeypatch.setattr(cuda_copy, "_KERNELS", {})
    monkeypatch.setattr(cuda_copy, "CudaKernels", failing_build)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no NVRTC"):
            cuda_copy.kernels_for(torch.device("cuda", 0))
    assert attempts == [torch.device("cuda", 0)]


# --- cache to cache ----------------------------------------------------------------------


def copied_storage(source, target, src_ids, dst_ids):
    """target's allocation after block dst_ids[i] became block src_ids[i] of source."""
    for s, d in zip(src_ids, dst_ids, strict=True):
        for layer in range(len(source.kv_caches)):
            target.write_block(layer, d, source.block_bytes(layer, s))
    return target.storage_bytes()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_blocks_between_caches_matches_plain_indexing(layout, case, device):
    dtype, shape, src_offset, dst_offset = case
    source = allocate_kv_caches(
        layout, shape, dtype, device=device, offset_bytes=src_offset, generator=rng(case, "s")
    )
    target, reference = (
        allocate_kv_caches(
            layout, shape, dtype, device=device, offset_bytes=dst_offset, generator=rng(case, "d")
        )
        for _ in range(2)
    )
    src_ids, dst_ids = [4, 0, 4, 6], [1, 5, 2, 0]
    mode = "cuda" if device == "cuda" else "torch"  # on a GPU the kernels, or a failure
    copy_blocks(source.kv_caches, src_ids, target.kv_caches, dst_ids, mode=mode)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(target.storage_bytes(), copied_storage(source, reference, src_ids, dst_ids))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s, d: (s, [1, 2], d, [3]), "2 source blocks but 1 destination"),
        (lambda s, d: (s, [1, 2], d, [3, 3]), "repeat"),
        (lambda s, d: (s, [9], d, [0]), "out of range"),
        (lambda s, d: (s, [1], {"layers.0": d["layers.0"]}, [0]), "differ in layout"),
        (lambda s, d: (s, [1], {k: v.float() for k, v in d.items()}, [0]), "differ in layout"),
    ],
    ids=["lengths", "repeated-destination", "range", "segments", "dtype"],
)
def test_copy_blocks_refuses_what_it_cannot_copy_before_any_byte_moves(change, message):
    source = allocate_kv_caches("LBHNC", SHAPE, generator=rng("refuse", "s"))
    target = allocate_kv_caches("LBHNC", SHAPE, generator=rng("refuse", "d"))
    before = target.storage_bytes()
    with pytest.raises(ValueError, match=message):
        copy_blocks(*change(source.kv_caches, target.kv_caches))
    assert torch.equal(target.storage_bytes(), before)


# --- on a GPU: the kernels against the torch path ---------------------------------------


@CUDA
@pytest.mark.parametrize("buffer_on", ["cuda", "pinned"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernels_match_the_torch_path(layout, case, buffer_on):
    dtype, shape, cache_offset, buffer_offset = case
    allocated = allocate_kv_caches(
        layout, shape, dtype, device="cuda", offset_bytes=cache_offset, generator=rng(case)
    )
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    ids = torch.randperm(shape.num_blocks, generator=rng(layout))[:5].tolist()
    nbytes = cache.buffer_bytes(len(ids))
    by_kernel, by_torch = (
        torch.zeros(nbytes + buffer_offset, dtype=torch.uint8, pin_memory=True)[buffer_offset:]
        if buffer_on == "pinned"
        else byte_buffer(nbytes, buffer_offset, "cuda")
        for _ in range(2)
    )
    gather_blocks(cache, ids, by_kernel, mode="cuda")
    gather_blocks(cache, ids, by_torch, mode="torch")
    torch.cuda.synchronize()
    assert torch.equal(by_kernel.cpu(), by_torch.cpu())
    assert torch.equal(by_kernel.cpu(), expected_buffer(allocated, ids).cpu())

    by_kernel.copy_(by_kernel.flip(0))
    scatter_blocks(cache, ids, by_kernel, mode="cuda")
    gather_blocks(cache, ids, by_torch, mode="torch")
    torch.cuda.synchronize()
    assert torch.equal(by_kernel.cpu(), by_torch.cpu())
