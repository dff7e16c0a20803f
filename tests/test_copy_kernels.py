"""The CUDA copy kernels, proven on every CI run without a GPU.

1. kernels/copy_pages.cu builds as host C++ through kernels/host_shim.h (g++, once per
   session) and, launched with the runtime's own geometry and argument packing, copies
   random caches of every vLLM layout byte for byte as plain indexing says it should, with
   block ids in random order, odd page sizes and unaligned pointers.
2. The runtime's NVRTC compile (vllm_llmd.ops.nvrtc.compile_cubin) succeeds for sm_80 and
   sm_90 through the NVRTC wheel (nvidia-cuda-nvrtc, a test extra), with an empty log.
3. nvcc, where installed, builds the kernels for sm_80 and sm_90 with warnings as errors.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_llmd.ops import PagedKVCache, cuda_copy, libcuda
from vllm_llmd.ops.cuda_copy import (
    LaunchGeometry,
    between_args,
    kernel_args,
    kernel_params,
    launch_geometry,
)
from vllm_llmd.ops.layouts import LAYOUTS, KVCacheShape, allocate_kv_caches
from vllm_llmd.ops.nvrtc import KERNEL_NAMES, MAIN_SOURCE, compile_cubin, find_libnvrtc

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
HARNESS = r"""
#include "host_shim.h"
#include "copy_pages.cu"

// Reads the arguments from cuLaunchKernel-style kernelParams (one address per argument), so
// the tests also cover how cuda_copy packs them.
extern "C" void host_launch(int gather, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                            void** params) {
  llmd_host_launch(gather ? llmd_gather_pages : llmd_scatter_pages, dim3(gx, gy, gz),
                   dim3(threads), *(const unsigned long long**)params[0], *(int*)params[1],
                   *(long long*)params[2], *(long long*)params[3],
                   *(const long long**)params[4], *(int*)params[5], *(long long*)params[6],
                   *(unsigned char**)params[7]);
}

extern "C" void host_launch_between(unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                                    void** params) {
  llmd_host_launch(llmd_copy_pages_between, dim3(gx, gy, gz), dim3(threads),
                   *(const unsigned long long**)params[0], *(long long*)params[1],
                   *(const long long**)params[2], *(const unsigned long long**)params[3],
                   *(long long*)params[4], *(const long long**)params[5], *(int*)params[6],
                   *(long long*)params[7], *(int*)params[8], *(long long*)params[9]);
}

// -fsanitize=alignment calls these on a misaligned access; counting them here (instead of
// libubsan printing to a stderr pytest swallows) lets each test assert there were none.
static unsigned long long misaligned_accesses = 0;
extern "C" void __ubsan_handle_type_mismatch_v1(void*, void*) { ++misaligned_accesses; }
extern "C" void __ubsan_handle_type_mismatch_v1_abort(void*, void*) { ++misaligned_accesses; }
extern "C" unsigned long long take_misaligned_accesses() {
  const unsigned long long count = misaligned_accesses;
  misaligned_accesses = 0;
  return count;
}
"""
# A grid smaller than the work and chunks that are not multiples of 16: every grid-stride
# loop runs more than once and chunk edges fall at every alignment.
TINY = LaunchGeometry(grid=(2, 2, 3), block=(5, 1, 1), chunk_bytes=37)
SHAPE = KVCacheShape(num_layers=3, num_blocks=9, num_heads=2, block_size=3, content=10)
ODD = KVCacheShape(num_layers=2, num_blocks=7, num_heads=3, block_size=5, content=7)  # 105 B
CASES = [  # (dtype, shape, cache offset bytes, buffer offset bytes)
    (torch.bfloat16, SHAPE, 0, 0),
    (torch.bfloat16, SHAPE, 2, 6),
    (torch.uint8, ODD, 1, 0),
    (torch.uint8, ODD, 3, 3),
    (torch.float32, ODD, 4, 12),
]


class HostKernels:
    """The kernels built as host C++, launched the way cuda_copy launches them on a GPU.

    Built with -fsanitize=alignment and 16/8-byte aligned uint4/uint2 (as in CUDA): a
    misaligned wide access, which x86 forgives but a GPU faults on, fails the test.
    """

    def __init__(self, build: Path) -> None:
        compiler = shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            pytest.fail("no C++ compiler on PATH: install g++ to test the kernels on the CPU")
        (build / "harness.cpp").write_text(HARNESS)
        library = build / "copy_pages_host.so"
        command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fno-strict-aliasing"]
        # general registers only: SSE's aligned moves would fault before the check counts
        command += ["-fsanitize=alignment", "-mgeneral-regs-only", f"-I{KERNELS}"]
        command += ["-Wall", "-Wextra", "-Werror", "harness.cpp", "-o", str(library)]
        result = subprocess.run(command, cwd=build, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        self.lib = ctypes.CDLL(str(library))
        self.lib.host_launch.restype = None
        self.lib.take_misaligned_accesses.restype = ctypes.c_ulonglong

    def launch(self, cache, ids, buffer, gather, geometry=None):
        ids = torch.as_tensor(ids, dtype=torch.int64)
        geometry = geometry or launch_geometry(cache, len(ids))
        address = buffer.data_ptr()
        args = kernel_args(cache, ids.data_ptr(), len(ids), geometry.chunk_bytes, address)
        grid = (ctypes.c_uint(n) for n in geometry.grid)
        threads = ctypes.c_uint(geometry.block[0])
        self.lib.host_launch(int(gather), *grid, threads, kernel_params(args))
        self.assert_aligned()

    def launch_between(self, src, src_ids, dst, dst_ids, geometry=None):
        src_ids = torch.as_tensor(src_ids, dtype=torch.int64)
        dst_ids = torch.as_tensor(dst_ids, dtype=torch.int64)
        geometry = geometry or launch_geometry(src, len(src_ids))
        args = between_args(
            src, src_ids.data_ptr(), dst, dst_ids.data_ptr(), len(src_ids), geometry.chunk_bytes
        )
        grid = (ctypes.c_uint(n) for n in geometry.grid)
        threads = ctypes.c_uint(geometry.block[0])
        self.lib.host_launch_between(*grid, threads, kernel_params(args))
        self.assert_aligned()

    def assert_aligned(self):
        misaligned = self.lib.take_misaligned_accesses()
        assert misaligned == 0, f"{misaligned} misaligned word accesses"


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory) -> HostKernels:
    return HostKernels(tmp_path_factory.mktemp("host_kernels"))


def rng(*parts) -> torch.Generator:
    """A generator seeded by the test's parameters: reruns see the same bytes."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def byte_buffer(nbytes, offset):
    """A uint8 buffer of nbytes that starts `offset` bytes past an aligned allocation."""
    return torch.full((offset + nbytes,), 0xEE, dtype=torch.uint8)[offset:]


def expected_buffer(allocated, ids):
    layers = range(len(allocated.kv_caches))
    return torch.cat([allocated.block_bytes(layer, block) for block in ids for layer in layers])


@pytest.mark.parametrize("geometry", [None, TINY], ids=["runtime-grid", "tiny-grid"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_gather_matches_plain_indexing(host_kernels, layout, case, geometry):
    dtype, shape, cache_offset, buffer_offset = case
    generator = rng(layout, case)
    allocated = allocate_kv_caches(
        layout, shape, dtype, offset_bytes=cache_offset, generator=generator
    )
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    ids = torch.randint(0, shape.num_blocks, (6,), generator=generator)  # repeats allowed
    out = byte_buffer(cache.buffer_bytes(len(ids)), buffer_offset)

    host_kernels.launch(cache, ids, out, gather=True, geometry=geometry)

    assert torch.equal(out, expected_buffer(allocated, ids.tolist()))


@pytest.mark.parametrize("geometry", [None, TINY], ids=["runtime-grid", "tiny-grid"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_scatter_matches_plain_indexing(host_kernels, layout, case, geometry):
    dtype, shape, cache_offset, buffer_offset = case
    allocated = allocate_kv_caches(
        layout, shape, dtype, offset_bytes=cache_offset, generator=rng(layout, case)
    )
    reference = allocate_kv_caches(
        layout, shape, dtype, offset_bytes=cache_offset, generator=rng(layout, case)
    )
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    generator = rng(layout, case, "ids")
    ids = torch.randperm(shape.num_blocks, generator=generator)[:5]
    src = byte_buffer(cache.buffer_bytes(len(ids)), buffer_offset)
    src.copy_(torch.randint(0, 256, src.shape, dtype=torch.uint8, generator=generator))

    host_kernels.launch(cache, ids, src, gather=False, geometry=geometry)

    pages = src.view(len(ids), len(reference.kv_caches), -1)
    for i, block in enumerate(ids.tolist()):
        for layer in range(len(reference.kv_caches)):
            reference.write_block(layer, block, pages[i, layer])
    assert torch.equal(allocated.storage_bytes(), reference.storage_bytes())


@pytest.mark.parametrize("geometry", [None, TINY], ids=["runtime-grid", "tiny-grid"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_copy_between_caches_matches_plain_indexing(host_kernels, layout, case, geometry):
    # Cache to cache, page to page (a peer's cache through CUDA IPC): the destination has more
    # blocks and another byte offset; only its named blocks change.
    dtype, shape, cache_offset, other_offset = case
    source = allocate_kv_caches(
        layout, shape, dtype, offset_bytes=cache_offset, generator=rng(layout, case, "src")
    )
    bigger = dataclasses.replace(shape, num_blocks=shape.num_blocks + 3)
    target, reference = (
        allocate_kv_caches(
            layout, bigger, dtype, offset_bytes=other_offset, generator=rng(layout, case, "dst")
        )
        for _ in range(2)
    )
    generator = rng(layout, case, "ids")
    src_ids = torch.randint(0, shape.num_blocks, (5,), generator=generator)  # repeats allowed
    dst_ids = torch.randperm(bigger.num_blocks, generator=generator)[:5]
    src_cache = PagedKVCache.from_layers(source.kv_caches)
    dst_cache = PagedKVCache.from_layers(target.kv_caches)

    host_kernels.launch_between(src_cache, src_ids, dst_cache, dst_ids, geometry=geometry)

    for s, d in zip(src_ids.tolist(), dst_ids.tolist(), strict=True):
        for layer in range(shape.num_layers):
            reference.write_block(layer, d, source.block_bytes(layer, s))
    assert torch.equal(target.storage_bytes(), reference.storage_bytes())


@pytest.mark.parametrize("cache_offset,buffer_offset", [(3, 3), (8, 0), (4, 12), (2, 6), (1, 0)])
def test_host_copy_at_every_access_width(host_kernels, cache_offset, buffer_offset):
    # One layer of 87-byte pages: the skew of the two pointers picks 16/8/4/2/1-byte words,
    # each with an unaligned head and a tail.
    shape = KVCacheShape(num_layers=1, num_blocks=4, num_heads=1, block_size=1, content=87)
    allocated = allocate_kv_caches("LBHNC", shape, torch.uint8, offset_bytes=cache_offset)
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    ids = [2, 0, 3]
    out = byte_buffer(cache.buffer_bytes(len(ids)), buffer_offset)
    host_kernels.launch(cache, ids, out, gather=True)
    assert torch.equal(out, expected_buffer(allocated, ids))

    back = allocate_kv_caches("LBHNC", shape, torch.uint8, offset_bytes=cache_offset)
    host_kernels.launch(PagedKVCache.from_layers(back.kv_caches), ids, out, gather=False)
    for block in ids:
        assert torch.equal(back.block_bytes(0, block), allocated.block_bytes(0, block))


def test_host_copy_of_many_blocks_and_large_pages(host_kernels):
    # Pages over one chunk (16 KiB) and a realistic layer count, in the runtime geometry.
    shape = KVCacheShape(num_layers=4, num_blocks=40, num_heads=2, block_size=16, content=272)
    allocated = allocate_kv_caches("LBHNC", shape, torch.bfloat16)
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    ids = torch.randperm(shape.num_blocks, generator=rng("many"))[:32]
    out = byte_buffer(cache.buffer_bytes(len(ids)), 0)
    host_kernels.launch(cache, ids, out, gather=True)
    assert cache.page_bytes > 16384
    assert torch.equal(out, expected_buffer(allocated, ids.tolist()))


class FakeDriver:
    """libcuda stand-in: records context pushes and runs each launch on the host build."""

    def __init__(self, host):
        self.host = host
        self.functions: dict[int, str] = {}
        self.depth = 0
        self.launches = 0

    def cuDeviceGet(self, device, ordinal):
        return 0

    def cuDevicePrimaryCtxRetain(self, context, device):
        context._obj.value = 0xC0
        return 0

    def cuCtxPushCurrent_v2(self, context):
        assert context.value == 0xC0
        self.depth += 1
        return 0

    def cuCtxPopCurrent_v2(self, context):
        self.depth -= 1
        return 0

    def cuModuleLoadData(self, module, image):
        assert self.depth == 1 and image[:4] == b"\x7fELF"
        return 0

    def cuModuleGetFunction(self, function, module, name):
        function._obj.value = len(self.functions) + 1
        self.functions[function._obj.value] = name.decode()
        return 0

    def cuMemHostGetDevicePointer_v2(self, address, host_pointer, flags):
        address._obj.value = host_pointer  # unified addressing: the same address
        return 0

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        assert self.depth == 1 and (by, bz, shared, extra) == (1, 1, 0, None)
        name = self.functions[function.value]
        grid = (ctypes.c_uint(n) for n in (gx, gy, gz))
        if name == "llmd_copy_pages_between":
            self.host.lib.host_launch_between(*grid, ctypes.c_uint(bx), params)
        else:
            gather = int(name == "llmd_gather_pages")
            self.host.lib.host_launch(gather, *grid, ctypes.c_uint(bx), params)
        self.launches += 1
        return 0


def test_cuda_path_compiles_loads_and_launches_as_the_kernels_expect(host_kernels, monkeypatch):
    # CudaKernels end to end with a CPU cache: NVRTC (the wheel) compiles, and the fake driver
    # runs the host build with the very kernelParams and grid the runtime passes.
    driver = FakeDriver(host_kernels)
    monkeypatch.setattr(cuda_copy, "_libcuda", lambda: driver)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))
    allocated = allocate_kv_caches("BHLNC", SHAPE, generator=rng("driver"))
    cache = PagedKVCache.from_layers(allocated.kv_caches)
    ids = [8, 1, 4]
    out = byte_buffer(cache.buffer_bytes(len(ids)), 0)

    kernels = cuda_copy.CudaKernels(torch.device("cpu"))
    kernels.copy(cache, torch.tensor(ids), out, gather=True)
    kernels.copy(cache, torch.tensor([0, 2, 3]), out, gather=False)

    assert torch.equal(out, expected_buffer(allocated, ids))
    assert torch.equal(expected_buffer(allocated, [0, 2, 3]), out)
    other = allocate_kv_caches("BHLNC", SHAPE, generator=rng("driver", "other"))
    kernels.copy_between(
        cache, torch.tensor([5, 5]), PagedKVCache.from_layers(other.kv_caches), torch.tensor([1, 7])
    )
    assert torch.equal(expected_buffer(other, [1, 7]), expected_buffer(allocated, [5, 5]))
    assert (driver.launches, driver.depth) == (3, 0)
    assert kernels.compiled.arch == "90" and kernels.compiled.log == ""


class FailingDriver(FakeDriver):
    """libcuda stand-in whose module load fails, as a driver with a bad image does."""

    def __init__(self) -> None:
        super().__init__(host=None)

    def cuModuleLoadData(self, module, image):
        return 200  # CUDA_ERROR_INVALID_IMAGE

    def cuGetErrorString(self, result, message):
        message._obj.value = b"device kernel image is invalid"
        return 0


def test_a_failing_driver_call_is_named_with_its_error_and_the_context_is_popped():
    # The one checked call of the kernels and the IPC path (ops/libcuda.py).
    driver = FailingDriver()
    expected = r"cuModuleLoadData failed on cuda:3: device kernel image is invalid \(200\)"
    with pytest.raises(RuntimeError, match=expected):
        with libcuda.pushed_context(driver, ctypes.c_void_p(0xC0)):
            libcuda.check_call(
                driver, "cuModuleLoadData", None, b"", device=torch.device("cuda", 3)
            )
    assert driver.depth == 0
    with pytest.raises(RuntimeError, match=r"^cuModuleLoadData failed: device kernel image"):
        libcuda.check_call(driver, "cuModuleLoadData", None, b"")


def test_kernel_sources_use_no_standard_headers():
    # NVRTC ships no C++ standard library headers; only our own header may be included.
    for path in sorted(KERNELS.glob("*.cu")) + sorted(KERNELS.glob("*.cuh")):
        includes = [ln for ln in path.read_text().splitlines() if ln.startswith("#include")]
        assert all('"' in line for line in includes), f"{path.name}: {includes}"


@pytest.mark.parametrize("arch", ["80", "90"])
def test_runtime_nvrtc_compile_is_clean(arch):
    # On CPU torch find_libnvrtc() finds the nvidia-cuda-nvrtc wheel (a test extra).
    compiled = compile_cubin(arch, find_libnvrtc())
    assert compiled.log == "", f"NVRTC warned compiling {MAIN_SOURCE}:\n{compiled.log}"
    assert compiled.cubin[:4] == b"\x7fELF"
    for name in KERNEL_NAMES:
        assert name.encode() in compiled.cubin


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_nvcc_builds_kernels_without_warnings(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin): the NVRTC test covers the compile")
    command = [nvcc, "-c", str(KERNELS / MAIN_SOURCE), "-o", str(tmp_path / "copy_pages.o")]
    for arch in ("80", "90"):
        command += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    command += ["-std=c++17", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert (tmp_path / "copy_pages.o").stat().st_size > 0
