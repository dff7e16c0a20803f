"""Where the bytes of each block of each layer live, and the checks every copy runs first.

`PagedKVCache.from_layers(kv_caches)` turns the dict vLLM hands `register_kv_caches` into
"segments": block b of segment s is `page_bytes` contiguous bytes at
`segment address + b * block_stride`. In every layout where one block of one layer is one
contiguous range (LBHNC, LBNHC, and the block-outermost BLHNC/BLNHC) a segment is a layer;
where it is not (LHBNC, BHLNC: the heads of a block are apart) a layer gives one segment per
contiguous run. When the segments of a block are back to back (block-outermost layouts) they
merge into one segment of the whole block.

A contiguous buffer holds, for each block id in the order given, each layer's bytes of that
block in memory order, layers in dict order (pages copied as opaque bytes):

    buffer = [ block_ids[0]: layer 0 | layer 1 | ... | block_ids[1]: layer 0 | ... ]

so the bytes of one block id are consecutive: a request's staging buffer can go over a wire
block by block. `block_bytes` is the size of one block id's part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# dtypes a buffer may have besides the cache's own: raw bytes.
BYTE_DTYPES = (torch.uint8, torch.int8)


@dataclass(frozen=True, eq=False)
class PagedKVCache:
    """The paged KV cache of one KV cache group, as segments of equal pages.

    eq=False: compared and hashed by identity, so copy paths may cache views per cache.
    """

    # Layers whose blocks the buffers hold, in buffer order; aliases (shared KV) appear once.
    layer_names: tuple[str, ...]
    num_blocks: int
    dtype: torch.dtype
    device: torch.device
    # Bytes of one block of one segment, and between block b and b + 1 of a segment.
    page_bytes: int
    block_stride: int
    # Per segment: the storage it lives in, and the byte offset of its block 0 there.
    storages: tuple[torch.UntypedStorage, ...]
    offsets: tuple[int, ...]
    # int64 [num_segments] on `device`: address of block 0 of each segment, for the kernels.
    base_table: torch.Tensor

    @property
    def num_segments(self) -> int:
        return len(self.offsets)

    @property
    def block_bytes(self) -> int:
        """Bytes one block id takes in a contiguous buffer (all layers)."""
        return self.num_segments * self.page_bytes

    def buffer_bytes(self, num_ids: int) -> int:
        return num_ids * self.block_bytes

    def base_addresses(self) -> list[int]:
        return [st.data_ptr() + off for st, off in zip(self.storages, self.offsets, strict=True)]

    @classmethod
    def from_layers(cls, kv_caches: Mapping[str, torch.Tensor]) -> PagedKVCache:
        """Describe the per-layer KV tensors of one group (each [num_blocks, ...]).

        Raises ValueError when the layers do not form one paged cache: different devices,
        dtypes, block counts or page shapes (build one PagedKVCache per KV cache group), or
        pages that overlap.
        """
        if not kv_caches:
            raise ValueError("kv_caches is empty: pass the dict given to register_kv_caches")
        layers = _unique_layers(kv_caches)
        first_name, first = next(iter(layers.items()))
        for name, tensor in layers.items():
            _check_same(first_name, first, name, tensor)
        runs = {name: _block_runs(name, tensor) for name, tensor in layers.items()}
        page_bytes = {page for page, _ in runs.values()}
        if len(page_bytes) != 1:
            sizes = {name: page for name, (page, _) in runs.items()}
            raise ValueError(
                f"layers have blocks of different layouts (contiguous run bytes {sizes}): "
                "build one PagedKVCache per KV cache group"
            )
        page = page_bytes.pop()
        stride = first.stride(0) * first.element_size()
        storages, offsets = [], []
        for name, tensor in layers.items():
            start = tensor.storage_offset() * tensor.element_size()
            for run in runs[name][1]:
                storages.append(tensor.untyped_storage())
                offsets.append(start + run)
        num_blocks = first.shape[0]
        _check_disjoint(storages, offsets, num_blocks, stride, page)
        if _back_to_back(storages, offsets, page):
            page, offsets, storages = page * len(offsets), offsets[:1], storages[:1]
        bases = [st.data_ptr() + off for st, off in zip(storages, offsets, strict=True)]
        return cls(
            layer_names=tuple(layers),
            num_blocks=num_blocks,
            dtype=first.dtype,
            device=first.device,
            page_bytes=page,
            block_stride=stride,
            storages=tuple(storages),
            offsets=tuple(offsets),
            base_table=torch.tensor(bases, dtype=torch.int64, device=first.device),
        )

    @classmethod
    def from_segments(
        cls,
        like: PagedKVCache,
        num_blocks: int,
        storages: Sequence[torch.UntypedStorage],
        offsets: Sequence[int],
    ) -> PagedKVCache:
        """A cache laid out as `like` (layers, dtype, device, pages), whose segments live in
        other storages (another process's, opened through CUDA IPC).

        Raises ValueError unless every segment's blocks lie inside its storage: the kernels
        write to raw addresses, so a description from elsewhere is checked before any copy.
        """
        if len(storages) != like.num_segments or len(offsets) != like.num_segments:
            raise ValueError(
                f"{len(offsets)} segments in {len(storages)} storages, but this cache's layout "
                f"has {like.num_segments}"
            )
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        span = (num_blocks - 1) * like.block_stride + like.page_bytes
        for index, (storage, offset) in enumerate(zip(storages, offsets, strict=True)):
            if storage.device != like.device:
                raise ValueError(f"segment {index} is on {storage.device}, not {like.device}")
            if offset < 0 or offset + span > storage.nbytes():
                raise ValueError(
                    f"segment {index}: {num_blocks} blocks from byte {offset} need "
                    f"{offset + span} bytes, its storage has {storage.nbytes()}"
                )
        bases = [st.data_ptr() + off for st, off in zip(storages, offsets, strict=True)]
        return cls(
            layer_names=like.layer_names,
            num_blocks=num_blocks,
            dtype=like.dtype,
            device=like.device,
            page_bytes=like.page_bytes,
            block_stride=like.block_stride,
            storages=tuple(storages),
            offsets=tuple(offsets),
            base_table=torch.tensor(bases, dtype=torch.int64, device=like.device),
        )


def as_paged_cache(cache: PagedKVCache | Mapping[str, torch.Tensor]) -> PagedKVCache:
    return cache if isinstance(cache, PagedKVCache) else PagedKVCache.from_layers(cache)


def check_block_ids(
    cache: PagedKVCache, block_ids: Sequence[int] | torch.Tensor, *, distinct: bool
) -> torch.Tensor:
    """Block ids as a CPU int64 tensor, after range (and, for writes, duplicate) checks.

    A CUDA tensor of ids costs a sync here: pass a list or a CPU tensor on hot paths.
    """
    if isinstance(block_ids, torch.Tensor) or len(block_ids):
        ids = torch.as_tensor(block_ids, device="cpu")
    else:
        ids = torch.empty(0, dtype=torch.int64)  # as_tensor([]) would be float32
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"block_ids must be integers, got {ids.dtype}")
    ids = ids.to(torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"block_ids must be one list of ids, got shape {tuple(ids.shape)}")
    bad = ids[(ids < 0) | (ids >= cache.num_blocks)]
    if bad.numel():
        raise ValueError(
            f"block ids {bad[:8].tolist()} are out of range: the cache has "
            f"{cache.num_blocks} blocks (ids 0..{cache.num_blocks - 1})"
        )
    if distinct:
        values, counts = torch.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"block ids {values[counts > 1][:8].tolist()} repeat: writing one block twice "
                "in one copy has no defined result; pass each destination block once"
            )
    return ids


def check_same_pages(src: PagedKVCache, dst: PagedKVCache) -> None:
    """Raise ValueError unless a block of src can be copied page by page into one of dst."""
    mine = (src.num_segments, src.page_bytes, src.dtype)
    theirs = (dst.num_segments, dst.page_bytes, dst.dtype)
    if mine != theirs:
        raise ValueError(
            f"the caches differ in layout: (segments, page bytes, dtype) {mine} != {theirs}"
        )
    if src.device != dst.device:
        raise ValueError(f"the caches are on {src.device} and {dst.device}: copy through a buffer")


def check_buffer(cache: PagedKVCache, buffer: torch.Tensor, num_ids: int, name: str) -> None:
    """Raise ValueError unless `buffer` can hold num_ids blocks of `cache` in buffer order."""
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(buffer).__name__}")
    if buffer.dtype != cache.dtype and buffer.dtype not in BYTE_DTYPES:
        raise ValueError(
            f"{name} has dtype {buffer.dtype} but the cache holds {cache.dtype}: "
            f"allocate it as {cache.dtype} or as torch.uint8 bytes"
        )
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous: pass a contiguous tensor (not a view)")
    expected = cache.buffer_bytes(num_ids)
    nbytes = buffer.numel() * buffer.element_size()
    if nbytes != expected:
        raise ValueError(
            f"{name} holds {nbytes} bytes but {num_ids} blocks take {expected} "
            f"({cache.block_bytes} bytes per block id): size it with cache.buffer_bytes(n)"
        )
    if buffer.device != cache.device and buffer.device.type != "cpu":
        raise ValueError(
            f"{name} is on {buffer.device} but the cache is on {cache.device}: "
            "use the cache's device or (pinned) CPU memory"
        )


def _unique_layers(kv_caches: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Layers that share KV map to the same view; their blocks go into a buffer once.
    seen: dict[tuple, str] = {}
    layers: dict[str, torch.Tensor] = {}
    for name, tensor in kv_caches.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"layer {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset() * tensor.element_size(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key not in seen:
            seen[key] = name
            layers[name] = tensor
    return layers


def _check_same(first_name: str, first: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() < 1 or tensor.numel() == 0:
        raise ValueError(f"layer {name!r} has shape {tuple(tensor.shape)}: expected [blocks, ...]")
    for what, a, b in (
        ("device", first.device, tensor.device),
        ("dtype", first.dtype, tensor.dtype),
        ("number of blocks (dim 0)", first.shape[0], tensor.shape[0]),
        ("block stride (dim 0)", first.stride(0), tensor.stride(0)),
    ):
        if a != b:
            raise ValueError(
                f"layers {first_name!r} and {name!r} differ in {what} ({a} vs {b}): "
                "build one PagedKVCache per KV cache group"
            )


def _block_runs(name: str, tensor: torch.Tensor) -> tuple[int, list[int]]:
    """(bytes per run, byte offset of each run) of one block of a layer, in memory order.

    The dims of a block sorted by stride give its memory order; the innermost ones that are
    dense form the run, the outer ones enumerate the runs.
    """
    shape, strides = tensor.shape[1:], tensor.stride()[1:]
    dims = sorted(
        ((size, stride) for size, stride in zip(shape, strides, strict=True) if size > 1),
        key=lambda dim: dim[1],
    )
    elem = tensor.element_size()
    run = 1  # elements
    while dims and dims[0][1] == run:
        run *= dims.pop(0)[0]
    offsets = [0]
    extent = run  # elements spanned so far, to catch dims that overlap inner ones
    for size, stride in dims:
        if stride < extent:
            raise ValueError(
                f"layer {name!r} has overlapping elements within a block "
                f"(shape {tuple(tensor.shape)}, strides {tensor.stride()})"
            )
        offsets = [outer * stride + inner for outer in range(size) for inner in offsets]
        extent = (size - 1) * stride + extent
    offsets.sort()
    return run * elem, [offset * elem for offset in offsets]


def _check_disjoint(
    storages: list[torch.UntypedStorage],
    offsets: list[int],
    num_blocks: int,
    block_stride: int,
    page: int,
) -> None:
    if num_blocks > 1 and block_stride < page:
        raise ValueError(
            f"blocks overlap: block stride {block_stride} bytes < {page} bytes per block"
        )
    # Segment j's block m overlaps segment i's block k when |d + (m - k) * stride| < page,
    # d = offset_j - offset_i; only the two multiples of the stride nearest to -d can.
    ptr = torch.tensor([st.data_ptr() for st in storages], dtype=torch.int64)
    off = torch.tensor(offsets, dtype=torch.int64)
    i, j = torch.triu_indices(len(offsets), len(offsets), offset=1)
    same = ptr[i] == ptr[j]
    d = (off[j] - off[i])[same]
    if d.numel() == 0:
        return
    step = max(block_stride, 1)
    limit = num_blocks - 1
    near = torch.div(-d, step, rounding_mode="floor")
    for k in (near, near + 1):
        k = k.clamp(-limit, limit)
        if ((d + k * block_stride).abs() < page).any():
            raise ValueError(
                "pages of different layers overlap in memory: pass each layer's own view "
                "(shared-KV layers as the same tensor)"
            )


def _back_to_back(storages: list[torch.UntypedStorage], offsets: list[int], page: int) -> bool:
    ptr = storages[0].data_ptr()
    return len(offsets) > 1 and all(
        st.data_ptr() == ptr and off == offsets[0] + s * page
        for s, (st, off) in enumerate(zip(storages, offsets, strict=True))
    )
