"""The connector's worker-side byte paths without vLLM: on a GPU, and the same code on the CPU.

A lent GPU machine has torch with CUDA and no vLLM; the checks of `scripts/gpu_checks.sh`
(tests/test_worker_byte_paths.py, benchmarks/bench_gpu_paths.py) drive the real
`LLMDConnectorWorker` through this module, on CUDA there and on the CPU in every CI run. What
stands in for vLLM, and nothing else does:

- **vLLM's KV cache allocation** (`allocate_kv_caches` over random bytes): one allocation per
  cache, per-layer `[blocks, heads, tokens, content]` views in the physical order an attention
  backend asks for (`BACKENDS`), as vLLM 0.32 hands them to `register_kv_caches`.
- **vLLM's base classes** the worker half imports (`vllm_stand_in`, only where vLLM is absent).
- **The scheduler half**: each check builds the step metadata it would plan (sends, pulls,
  offload stores, spills, loads) and calls the worker's hooks in vLLM's order.
- **Another host**, for the socket path of a pull between two processes of one machine: the
  decode process's host id is blanked (`another_host`), as a peer elsewhere has a different
  one.

Everything else is the real code: the worker, its side channel (`TransferServer`, the
puller, CUDA IPC, shared memory, leases), the offload worker and disk store, the copy kernels
(`vllm_llmd.ops`) and the shared tier's chunk layout.

The prefill half of a pull runs in a process of its own (CUDA IPC cannot open a handle of its
own process): `python -m vllm_llmd.devtools.worker_harness prefill DEVICE CASES_JSON` builds
a producing worker per case and answers JSON lines on stdin (`PrefillProcess` drives it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vllm_llmd.devtools import vllm_stand_in

vllm_stand_in.install()  # before the worker half imports vLLM's names

# ruff: noqa: E402 (the worker half must be imported after the stand-in is installed)
from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import (
    LLMDConnectorMetadata,
    OffloadLoadSpec,
    RecvSpec,
    ReleaseSpec,
    SendSpec,
)
from vllm_llmd.connector.worker import LLMDConnectorWorker
from vllm_llmd.job_tally import JobKind, JobTally
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.ops.layouts import AllocatedKVCache, KVCacheShape, allocate_kv_caches
from vllm_llmd.transfer import client as transfer_client

__all__ = [  # the step metadata's types too: importing them here installs the stand-in first
    "BACKENDS",
    "DTYPES",
    "Backend",
    "CacheCase",
    "LLMDConnectorMetadata",
    "LLMDConnectorWorker",
    "OffloadLoadSpec",
    "PrefillProcess",
    "RecvSpec",
    "ReleaseSpec",
    "SendSpec",
    "another_host",
    "block_bytes",
    "make_worker",
    "new_transfer_id",
    "step",
    "wait_loaded",
    "wait_reported",
]


@dataclass(frozen=True)
class Backend:
    """The per-layer KV view an attention backend asks vLLM 0.32 for."""

    layout: str  # physical order of [L, B, H, N, C] (vllm_llmd.ops.layouts)
    num_heads: int  # KV heads of one worker (1: MLA's one latent per token)
    content: int  # elements per token per head: K and V (2 * head_size), or MLA's latent


BACKENDS: dict[str, Backend] = {
    # FlashAttention's default "NHD": a block's page is [tokens, heads, K|V]
    "flash_attn": Backend("LBNHC", num_heads=8, content=2 * 128),
    # FlashInfer's "HND" (and what Nixl and Offloading ask for): [heads, tokens, K|V]
    "flashinfer": Backend("LBHNC", num_heads=8, content=2 * 128),
    # MLA (DeepSeek): one compressed latent per token, kv_lora_rank 512 + rope 64
    "mla": Backend("LBHNC", num_heads=1, content=512 + 64),
    # the block-outermost "packed" order a connector may ask for: a block holds every layer
    "cross_layer": Backend("BLHNC", num_heads=8, content=2 * 128),
}
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,  # vLLM's fp8 KV cache (e4m3)
}


@dataclass(frozen=True)
class CacheCase:
    """One KV cache geometry: a backend's view, a dtype, a block size and a size."""

    backend: str
    dtype: str
    block_size: int
    num_layers: int = 4
    num_blocks: int = 24
    # the instance's tensor-parallel size: each worker's cache holds its share of the heads
    tp_size: int = 1

    @property
    def name(self) -> str:
        tp = f"-tp{self.tp_size}" if self.tp_size > 1 else ""
        return f"{self.backend}-{self.dtype}-b{self.block_size}{tp}"

    @property
    def num_heads(self) -> int:
        """KV heads of one worker."""
        return BACKENDS[self.backend].num_heads // self.tp_size

    @property
    def shape(self) -> KVCacheShape:
        backend = BACKENDS[self.backend]
        return KVCacheShape(
            self.num_layers, self.num_blocks, self.num_heads, self.block_size, backend.content
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one layer."""
        shape = self.shape
        elem = torch.empty(0, dtype=self.torch_dtype).element_size()
        return shape.num_heads * shape.block_size * shape.content * elem

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.page_bytes

    def allocate(self, device: str | torch.device, seed: int) -> AllocatedKVCache:
        """A cache of random bytes: the same bytes for the same seed on every device."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.name}/{seed}".encode()))
        backend = BACKENDS[self.backend]
        return allocate_kv_caches(
            backend.layout, self.shape, self.torch_dtype, device=device, generator=generator
        )

    def fingerprint(self) -> KVLayoutFingerprint:
        backend = BACKENDS[self.backend]
        return KVLayoutFingerprint(
            model="worker-harness",
            dtype=self.dtype,
            num_layers=self.num_layers,
            num_kv_heads=self.num_heads,
            head_size=backend.content // 2,
            block_size=self.block_size,
            layout=backend.layout,
            tensor_parallel_size=self.tp_size,
            page_bytes=self.page_bytes,
            total_num_kv_heads=backend.num_heads,
        )


def block_bytes(allocated: AllocatedKVCache, block_id: int) -> torch.Tensor:
    """One block of every layer as CPU uint8, read by plain indexing (the reference)."""
    layers = range(len(allocated.kv_caches))
    return torch.cat([allocated.block_bytes(layer, block_id).cpu() for layer in layers])


def make_worker(
    case: CacheCase,
    device: str | torch.device,
    seed: int,
    *,
    is_producer: bool = False,
    tp_rank: int = 0,
    **config_keys: Any,
) -> tuple[LLMDConnectorWorker, AllocatedKVCache]:
    """A real worker half (rank tp_rank of case.tp_size) over a new cache of `case`,
    registered as vLLM registers it."""
    config = LLMDConnectorConfig(**config_keys)
    worker = LLMDConnectorWorker(
        config, case.fingerprint(), tp_rank, is_producer=is_producer, world_size=case.tp_size
    )
    allocated = case.allocate(device, seed)
    try:
        worker.register_kv_caches(allocated.kv_caches)
    except BaseException:
        worker.shutdown()
        raise
    return worker, allocated


def step(worker: LLMDConnectorWorker, metadata: LLMDConnectorMetadata) -> None:
    """One engine step's hooks, in vLLM's order, around a forward that computes nothing here
    (it is enqueued on the caller's current CUDA stream, where a test may put one)."""
    worker.handle_preemptions(metadata)
    worker.start_load_kv(metadata)
    worker.wait_for_save(metadata)


def wait_loaded(worker: LLMDConnectorWorker, request_id: str, timeout_s: float = 30.0) -> bool:
    """Step (idle) until the worker reports request_id's load; True if it failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # an idle step: get_finished waits (idle_wait_ms) for a load to end, and wakes at once
        worker.start_load_kv(LLMDConnectorMetadata(idle_step=True))
        _, recving, failed = worker.get_finished(set())
        if request_id in recving:
            return request_id in failed
        if worker.config.idle_wait_ms <= 0:
            time.sleep(0.0005)
    raise TimeoutError(f"the load of {request_id} did not end within {timeout_s} s")


# every report each worker gave so far, of every kind: one metadata can carry reports of
# several kinds, and a wait for one kind must not drop another's (a store straight to disk
# reports its spill while the host stores are still being waited for)
_reports: weakref.WeakKeyDictionary[LLMDConnectorWorker, JobTally] = weakref.WeakKeyDictionary()


def wait_reported(
    worker: LLMDConnectorWorker, kind: JobKind, keys: Sequence[bytes], timeout_s: float = 30.0
) -> dict[bytes, list[int]]:
    """The worker's reports of `kind` for every key, [finished, failed] per key: those it gave
    since it was made, earlier waits included."""
    deadline = time.monotonic() + timeout_s
    reports = _reports.setdefault(worker, JobTally())
    while True:
        metadata = worker.build_worker_metadata()
        if metadata is not None:
            reports.merge(metadata.results)
        seen = reports.counts.get(kind, {})
        if all(key in seen for key in keys):
            return seen
        if time.monotonic() >= deadline:
            break
        time.sleep(0.0005)
    raise TimeoutError(f"{sum(k in seen for k in keys)} of {len(keys)} {kind.value} reports came")


@contextlib.contextmanager
def another_host() -> Iterator[None]:
    """Pulls from this process as from another host: no shared memory, no CUDA IPC."""
    saved = transfer_client._HOST_ID
    transfer_client._HOST_ID = ""
    try:
        yield
    finally:
        transfer_client._HOST_ID = saved


def new_transfer_id() -> str:
    return secrets.token_hex(16)


# ---- the prefill process --------------------------------------------------------------------


class PrefillProcess:
    """A process of producing workers, one per case, each holding its cache of seed 1 + index.

    Its caches' bytes are known here (`CacheCase.allocate` with the same seed), so a pull's
    result is checked against plain indexing of a copy made in this process.
    """

    def __init__(self, device: str, cases: Sequence[CacheCase], **config_keys: Any) -> None:
        spec = json.dumps({"cases": [asdict(c) for c in cases], "config": config_keys})
        self.cases = list(cases)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm_llmd.devtools.worker_harness", "prefill", device, spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            ready = self._read()
        except BaseException:
            self.close()
            raise
        self.ports: list[int] = ready["ports"]

    def seed(self, index: int) -> int:
        return 1 + index

    def hold(self, index: int, request_id: str, transfer_id: str, block_ids: list[int]) -> None:
        """The prefill step that finished request_id: its blocks are held for a pull."""
        self._call(op="hold", case=index, request_id=request_id, transfer_id=transfer_id,
                   block_ids=block_ids)  # fmt: skip

    def released(self, index: int, request_id: str, timeout_s: float = 10.0) -> dict[str, int]:
        """Step the prefill worker until it reports request_id sent (its blocks freed); its
        side channel's byte counters and the blocks it still holds."""
        return self._call(op="released", case=index, request_id=request_id, timeout_s=timeout_s)

    def recv_spec(
        self,
        index: int,
        request_id: str,
        transfer_id: str,
        remote: Sequence[int],
        local: Sequence[int],
    ) -> RecvSpec:
        case = self.cases[index]
        return RecvSpec(
            request_id=request_id,
            host="127.0.0.1",
            ports=(self.ports[index],),
            transfer_id=transfer_id,
            fingerprint=case.fingerprint(),
            remote_block_ids=tuple(remote),
            local_block_ids=tuple(local),
            num_tokens=len(remote) * case.block_size,
        )

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.communicate("", timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> PrefillProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, **message: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        while line and not line.startswith("{"):  # a library's print: not ours, passed on
            sys.stderr.write(f"[prefill process] {line}")
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the prefill process exited ({self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the prefill process: {answer['error']}")
        return answer


def _serve_prefill(device: str, spec: dict[str, Any]) -> None:
    cases = [CacheCase(**case) for case in spec["cases"]]
    workers = []
    try:
        for index, case in enumerate(cases):
            worker, _ = make_worker(case, device, 1 + index, is_producer=True, **spec["config"])
            workers.append(worker)
        ports = [worker.server.port for worker in workers if worker.server is not None]
        print(json.dumps({"ports": ports}), flush=True)
        for line in sys.stdin:
            try:
                answer = _prefill_command(workers, json.loads(line))
            except Exception as exc:  # answered, so the driving test names it
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        for worker in workers:
            worker.shutdown()


def _prefill_command(workers: list[LLMDConnectorWorker], message: dict[str, Any]) -> Any:
    worker = workers[message["case"]]
    request_id = message["request_id"]
    if message["op"] == "hold":
        send = SendSpec(request_id, message["transfer_id"], tuple(message["block_ids"]))
        step(worker, LLMDConnectorMetadata(sends=[send]))
        return {"ok": True}
    if message["op"] == "released":
        deadline = time.monotonic() + message["timeout_s"]
        reported = False
        while not reported and time.monotonic() < deadline:
            worker.start_load_kv(LLMDConnectorMetadata())
            sending, _, _ = worker.get_finished({request_id})
            reported = request_id in sending
            time.sleep(0.001)
        server = worker.server
        assert server is not None
        return {
            "reported": reported,
            "held": len(worker.registry),
            "bytes_ipc": server.bytes_ipc,
            "bytes_sent": server.bytes_sent,
            "bytes_shared": server.bytes_shared,
        }
    raise ValueError(f"unknown op {message['op']!r}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "prefill":
        raise SystemExit("usage: python -m vllm_llmd.devtools.worker_harness prefill DEVICE SPEC")
    _serve_prefill(sys.argv[2], json.loads(sys.argv[3]))
