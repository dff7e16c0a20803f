"""The worker half's byte paths, byte-exact against plain indexing, on the CPU and on CUDA.

Through `vllm_llmd.devtools.worker_harness` (which names what stands in for vLLM): caches in
the views vLLM's attention backends ask for (FlashAttention, FlashInfer, MLA, the packed
cross-layer order) in bf16, fp16 and fp8, blocks of 16 and 64 tokens.

- the copy kernels (on CUDA; the torch path on the CPU): device→device, device→pinned host and
  pinned host→device;
- a P/D pull between two processes with the real side channel: CUDA IPC (GPU), shared memory
  and the socket, each path proven by the prefill's byte counters, the blocks released (and
  between two GPUs where the machine has them); a decode of TP 2 reading its heads from a
  prefill of TP 1; a release unread, and a pull of a transfer not held;
- the offload tiers: stores into host slots, spills and stores straight to disk, a load from
  host slots and disk files back into the cache; on CUDA, a store ordered after a forward on
  another stream;
- the shared tier's staging into LMCache's chunk object, against the chunk built by indexing;
- the harness itself in processes that cannot import vLLM (as on the lent GPU machines).

Every test runs on the CPU in CI; the `cuda` ones run where a GPU is (scripts/gpu_checks.sh).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_llmd.devtools import vllm_stand_in
from vllm_llmd.devtools import worker_harness as harness
from vllm_llmd.devtools.worker_harness import (  # the worker's types, after the stand-in
    CacheCase,
    LLMDConnectorMetadata,
    OffloadLoadSpec,
    PrefillProcess,
    ReleaseSpec,
)
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.offload.jobs import DiskStoreJob, OffloadStepSpec, SpillJob, StoreJob
from vllm_llmd.ops import PagedKVCache, gather_blocks, scatter_blocks
from vllm_llmd.shared_tier.layout import ChunkLayout

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
COPY_CASES = [
    CacheCase(backend, dtype, block_size)
    for backend in harness.BACKENDS
    for dtype in harness.DTYPES
    for block_size in (16, 64)
]
PULL_CASES = [
    CacheCase("flash_attn", "bf16", 16),
    CacheCase("flashinfer", "fp16", 64),
    CacheCase("mla", "fp8", 64),
    CacheCase("cross_layer", "bf16", 16),
]


def ids(case: CacheCase) -> str:
    return case.name


# ---- the copy kernels -------------------------------------------------------------------


def buffer_for(direction: str, nbytes: int, device: str) -> torch.Tensor:
    if direction == "device":
        return torch.full((nbytes,), 0xEE, dtype=torch.uint8, device=device)
    return torch.full((nbytes,), 0xEE, dtype=torch.uint8).pin_memory()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", COPY_CASES, ids=ids)
def test_copies_match_plain_indexing_in_every_direction(case: CacheCase, device: str) -> None:
    allocated = case.allocate(device, seed=0)
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    assert cache.block_bytes == case.block_bytes
    mode = "cuda" if device == "cuda" else "torch"  # the kernels or nothing on a GPU
    gathered = [17, 3, 3, 0, 23, 9]  # out of order, one repeated
    scattered = [4, 21, 0, 12, 7]
    # pinned host buffers: device -> host (gather) and host -> device (scatter)
    for direction in ("device", "pinned") if device == "cuda" else ("device",):
        out = buffer_for(direction, cache.buffer_bytes(len(gathered)), device)
        gather_blocks(cache, gathered, out, mode=mode)
        if device == "cuda":
            torch.cuda.synchronize()
        want = torch.cat([harness.block_bytes(allocated, b) for b in gathered])
        assert torch.equal(out.cpu(), want), f"gather to {direction}"

        source = torch.randint(0, 256, (cache.buffer_bytes(len(scattered)),), dtype=torch.uint8)
        src = buffer_for(direction, source.numel(), device)
        src.copy_(source)
        untouched = harness.block_bytes(allocated, 1)
        scatter_blocks(cache, scattered, src, mode=mode)
        if device == "cuda":
            torch.cuda.synchronize()
        pages = source.view(len(scattered), -1)
        for i, block in enumerate(scattered):
            assert torch.equal(harness.block_bytes(allocated, block), pages[i]), (direction, block)
        assert torch.equal(harness.block_bytes(allocated, 1), untouched)


# ---- P/D between two processes ----------------------------------------------------------


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(
    scope="module",
    params=[*DEVICES, pytest.param("cuda:1", marks=TWO_GPUS)],  # cuda:1: decode on cuda:0
    ids=["cpu", "cuda", "cuda-to-another-gpu"],
)
def prefill(request):
    with PrefillProcess(request.param, PULL_CASES) as process:
        yield request.param, process


def decode_device(prefill_device: str) -> str:
    return "cuda:0" if prefill_device.startswith("cuda") else "cpu"


PATHS = ["cuda_ipc", "shm", "socket"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("index", range(len(PULL_CASES)), ids=[c.name for c in PULL_CASES])
def test_a_pull_between_two_processes_moves_the_blocks_byte_exact(prefill, index, path) -> None:
    device, process = prefill
    if path == "cuda_ipc" and device == "cpu":
        pytest.skip("CUDA IPC needs a GPU (faked in tests/test_cuda_ipc.py)")
    case = PULL_CASES[index]
    remote, local = [5, 1, 22, 3, 16, 8, 0], [2, 9, 4, 11, 23, 0, 17]
    expected = case.allocate("cpu", process.seed(index))  # the prefill cache's bytes
    decode, allocated = harness.make_worker(
        case, decode_device(device), 100, cuda_ipc=path == "cuda_ipc"
    )
    try:
        before = process.released(index, "none", timeout_s=0)  # the counters so far
        untouched = {b: harness.block_bytes(allocated, b) for b in (1, 3, 5)}
        transfer_id = harness.new_transfer_id()
        process.hold(index, "req-" + path, transfer_id, remote)
        recv = process.recv_spec(index, "req-" + path, transfer_id, remote, local)
        with harness.another_host() if path == "socket" else contextlib.nullcontext():
            decode.start_load_kv(LLMDConnectorMetadata(recvs=[recv]))
            assert harness.wait_loaded(decode, "req-" + path) is False
        for source, target in zip(remote, local, strict=True):
            want = harness.block_bytes(expected, source)
            assert torch.equal(harness.block_bytes(allocated, target), want), target
        for block, data in untouched.items():
            assert torch.equal(harness.block_bytes(allocated, block), data)
        after = process.released(index, "req-" + path)
        assert after["reported"] and after["held"] == 0  # released: vLLM may free the blocks
        moved = {k: after[k] - before[k] for k in ("bytes_ipc", "bytes_sent", "bytes_shared")}
        counter = {"cuda_ipc": "bytes_ipc", "shm": "bytes_shared", "socket": "bytes_sent"}[path]
        assert moved == {k: len(remote) * case.block_bytes * (k == counter) for k in moved}
    finally:
        decode.shutdown()


@pytest.mark.parametrize("index", [0, 1], ids=[c.name for c in PULL_CASES[:2]])
def test_a_decode_of_tp_2_pulls_its_heads_from_a_prefill_of_tp_1(prefill, index) -> None:
    """Each decode rank reads its half of the heads of every block (head-sliced reads), and
    the prefill frees the blocks once both ranks released them."""
    device, process = prefill
    case = PULL_CASES[index]
    decode_case = dataclasses.replace(case, tp_size=2)
    remote, local = [5, 1, 22], [2, 9, 4]
    expected = case.allocate("cpu", process.seed(index))
    transfer_id = harness.new_transfer_id()
    process.hold(index, "req-tp", transfer_id, remote)
    recv = process.recv_spec(index, "req-tp", transfer_id, remote, local)
    ranks = []
    try:
        for rank in (0, 1):
            ranks.append(
                harness.make_worker(decode_case, decode_device(device), 100 + rank, tp_rank=rank)
            )
        for worker, _ in ranks:
            worker.start_load_kv(LLMDConnectorMetadata(recvs=[recv]))
        for worker, _ in ranks:
            assert harness.wait_loaded(worker, "req-tp") is False
        heads = decode_case.num_heads
        for rank, (_, allocated) in enumerate(ranks):
            for name, layer in allocated.kv_caches.items():  # the logical [B, H, N, C] views
                for source, target in zip(remote, local, strict=True):
                    want = expected.kv_caches[name][source, rank * heads : (rank + 1) * heads]
                    got = layer[target].cpu()
                    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
        assert process.released(index, "req-tp")["held"] == 0
    finally:
        for worker, _ in ranks:
            worker.shutdown()


def test_a_decode_that_gives_up_releases_the_blocks_without_reading_them(prefill) -> None:
    """An aborted request: the decode side releases the transfer unread (ReleaseSpec); the
    prefill frees the blocks then, not at its lease's end."""
    device, process = prefill
    case = PULL_CASES[0]
    decode, _ = harness.make_worker(case, decode_device(device), 100)
    try:
        transfer_id = harness.new_transfer_id()
        process.hold(0, "req-aborted", transfer_id, [1, 2, 3])
        ports = (process.ports[0],)
        release = ReleaseSpec("127.0.0.1", ports, transfer_id, "aborted by the client")
        decode.start_load_kv(LLMDConnectorMetadata(releases=[release]))
        after = process.released(0, "req-aborted")
        assert after["reported"] and after["held"] == 0
    finally:
        decode.shutdown()


def test_a_pull_of_a_transfer_not_held_fails_its_load_and_pins_nothing(prefill) -> None:
    device, process = prefill
    case = PULL_CASES[0]
    decode, allocated = harness.make_worker(
        case, decode_device(device), 100, unknown_transfer_grace_s=0.2, transfer_timeout_s=2
    )
    try:
        before = [harness.block_bytes(allocated, b) for b in range(case.num_blocks)]
        recv = process.recv_spec(0, "req-gone", harness.new_transfer_id(), [1, 2], [3, 4])
        decode.start_load_kv(LLMDConnectorMetadata(recvs=[recv]))
        assert harness.wait_loaded(decode, "req-gone") is True  # failed: vLLM recomputes
        after = [harness.block_bytes(allocated, b) for b in range(case.num_blocks)]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert process.released(0, "req-gone", timeout_s=0)["held"] == 0
    finally:
        decode.shutdown()


# ---- the offload tiers ------------------------------------------------------------------


def key(i: int) -> bytes:
    return hashlib.sha256(f"harness block {i}".encode()).digest()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PULL_CASES, ids=ids)
def test_offload_stores_spills_and_loads_back_byte_exact(
    case: CacheCase, device: str, tmp_path: Path
) -> None:
    worker, allocated = harness.make_worker(
        case,
        device,
        7,
        host_offload_bytes=6 * case.block_bytes,
        disk_offload_path=str(tmp_path),
        disk_offload_bytes=64 * case.block_bytes,
        offload_staging_bytes=4 * case.block_bytes,
    )
    try:
        sources = [3, 11, 0, 19, 7, 15, 2, 20]  # 0-5 to host slots, 6-7 straight to disk
        originals = [harness.block_bytes(allocated, b) for b in sources]
        stores = tuple(StoreJob(key(i), sources[i], slot=i) for i in range(6))
        disk_stores = tuple(DiskStoreJob(key(i), sources[i], i - 6, "") for i in (6, 7))
        harness.step(worker, LLMDConnectorMetadata())  # a step before: nothing to do
        step_spec = OffloadStepSpec(stores=stores, disk_stores=disk_stores)
        harness.step(worker, LLMDConnectorMetadata(offload_step=step_spec))
        stored = harness.wait_reported(worker, JobKind.STORE, [key(i) for i in range(6)])
        assert all(stored[key(i)] == [1, 0] for i in range(6))
        spills = tuple(SpillJob(key(i), slot=i, info="") for i in (3, 4, 5))
        harness.step(worker, LLMDConnectorMetadata(offload_step=OffloadStepSpec(spills=spills)))
        on_disk = [key(i) for i in (3, 4, 5, 6, 7)]
        spilled = harness.wait_reported(worker, JobKind.SPILL, on_disk)
        assert all(spilled[k] == [1, 0] for k in on_disk)

        targets = [1, 4, 5, 8, 9, 10, 12, 13]  # blocks of a later request with the same prefix
        load = OffloadLoadSpec(
            "req-hit",
            block_ids=tuple(targets[:3]),
            slots=(0, 1, 2),
            disk_block_ids=tuple(targets[3:]),
            disk_keys=tuple(on_disk),
        )
        worker.start_load_kv(LLMDConnectorMetadata(offload_loads=[load]))
        assert harness.wait_loaded(worker, "req-hit") is False
        for target, original in zip(targets, originals, strict=True):
            assert torch.equal(harness.block_bytes(allocated, target), original), target
        read = harness.wait_reported(worker, JobKind.DISK_READ, on_disk)
        assert all(read[k] == [1, 0] for k in on_disk)
    finally:
        worker.shutdown()


def test_a_wait_for_one_kind_of_report_keeps_the_others_it_drained() -> None:
    """A store straight to disk reports its spill in the metadata that may also end the wait
    for the host stores: the wait for the spills must still find it (CI once waited 30 s for
    a spill report the store wait had drained)."""

    class Reporting:  # a worker's report channel: one metadata, then nothing
        def __init__(self, tally: JobTally) -> None:
            self.pending = [SimpleNamespace(results=tally)]

        def build_worker_metadata(self) -> SimpleNamespace | None:
            return self.pending.pop() if self.pending else None

    tally = JobTally()
    tally.record(JobKind.STORE, b"host", True)
    tally.record(JobKind.SPILL, b"disk", True)
    worker = Reporting(tally)
    assert harness.wait_reported(worker, JobKind.STORE, [b"host"]) == {b"host": [1, 0]}
    assert harness.wait_reported(worker, JobKind.SPILL, [b"disk"], timeout_s=0.1) == {
        b"disk": [1, 0]
    }
    with pytest.raises(TimeoutError, match="0 of 1 spill reports came"):
        harness.wait_reported(worker, JobKind.SPILL, [b"never"], timeout_s=0.05)


@needs_cuda
def test_a_store_reads_what_its_forward_writes_whatever_stream_vllm_computes_on() -> None:
    """The store is handed over right after the forward was enqueued, before it ran (as vLLM
    calls wait_for_save): it must read the bytes that forward writes, on vLLM's stream, not the
    ones before. A store on a stream of its own without the mark would read stale bytes."""
    case = CacheCase("flashinfer", "bf16", 16)
    worker, allocated = harness.make_worker(
        case, "cuda", 7, host_offload_bytes=2 * case.block_bytes
    )
    try:
        forward = torch.cuda.Stream()
        store = OffloadStepSpec(stores=(StoreJob(key(0), block_id=5, slot=0),))
        with torch.cuda.stream(forward):
            torch.cuda._sleep(200_000_000)  # the forward's compute: ~0.1 s of GPU time
            for layer in allocated.kv_caches.values():
                layer[5].view(torch.uint8).fill_(0x5A)  # what it writes into block 5
            harness.step(worker, LLMDConnectorMetadata(offload_step=store))
        assert harness.wait_reported(worker, JobKind.STORE, [key(0)])[key(0)] == [1, 0]
        load = OffloadLoadSpec("req-after", block_ids=(9,), slots=(0,))
        worker.start_load_kv(LLMDConnectorMetadata(offload_loads=[load]))
        assert harness.wait_loaded(worker, "req-after") is False
        assert bool((harness.block_bytes(allocated, 9) == 0x5A).all())
    finally:
        worker.shutdown()


# ---- the shared tier's chunk objects ----------------------------------------------------


def chunk_by_indexing(allocated, layout: ChunkLayout, block_ids: list[int]) -> torch.Tensor:
    """LMCache's chunk object [layers, tokens, heads * C] from the [B, H, N, C] views."""
    rows = []
    for name in allocated.kv_caches:
        layer = allocated.kv_caches[name].cpu()
        pages = [layer[b].transpose(0, 1).reshape(layout.block_size, -1) for b in block_ids]
        rows.append(torch.cat(pages))
    return torch.stack(rows).view(torch.uint8)


SHARED_CASES = [c for c in PULL_CASES if c.backend != "cross_layer"] + [
    CacheCase("flash_attn", "fp8", 16)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SHARED_CASES, ids=ids)
def test_shared_tier_staging_writes_lmcache_chunks_and_reads_them_back(
    case: CacheCase, device: str
) -> None:
    """The shared tier's store (gather into host staging, pinned on CUDA, then into the chunk)
    and load (chunk into staging, scatter into the cache)."""
    allocated = case.allocate(device, seed=3)
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    layout = ChunkLayout.from_kv_caches(allocated.kv_caches, cache, 2 * case.block_size)
    block_ids = [9, 2]
    staging = torch.empty(cache.buffer_bytes(2), dtype=torch.uint8, pin_memory=device == "cuda")
    gather_blocks(cache, block_ids, staging)
    if device == "cuda":
        torch.cuda.synchronize()
    chunk = torch.zeros(layout.chunk_shape, dtype=case.torch_dtype)
    layout.to_chunk(staging, chunk)
    assert torch.equal(chunk.view(torch.uint8), chunk_by_indexing(allocated, layout, block_ids))

    back = torch.empty_like(staging)
    layout.from_chunk(chunk, back)
    scatter_blocks(cache, [0, 5], back)
    if device == "cuda":
        torch.cuda.synchronize()
    for source, target in zip(block_ids, [0, 5], strict=True):
        assert torch.equal(
            harness.block_bytes(allocated, target),
            harness.block_bytes(case.allocate("cpu", 3), source),
        )


# ---- the harness itself -----------------------------------------------------------------


@pytest.mark.skipif(not vllm_stand_in.vllm_importable(), reason="no vLLM here: all of it ran so")
def test_the_harness_runs_without_vllm(tmp_path: Path) -> None:
    """What scripts/gpu_checks.sh runs, in processes (the prefill's too) that cannot import
    vLLM: the worker half runs on the stand-in alone."""
    vllm_stand_in.hide_vllm_in(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    selected = "cpu and (flash_attn-bf16-b16 or mla-fp8-b64) and not without_vllm"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "error" not in result.stdout.lower()
