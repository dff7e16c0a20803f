"""The CUDA path of block copies: the kernels of kernels/copy_pages.cu, one launch per copy
(cache to buffer, buffer to cache, or cache to cache).

At first use on a device the kernels are compiled with NVRTC (nvrtc.compile_cubin, for that
device's sm_XY), loaded into the device's primary context (the one torch uses) and cached;
a failure is cached too, so callers can fall back once and not retry on every copy. Launches
go through the CUDA driver (cuLaunchKernel) on torch's current stream, with every argument in
the exact C type of the kernel's signature.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass

import torch

from vllm_llmd.ops.libcuda import (
    check_call,
    load_libcuda,
    pushed_context,
    retain_primary_context,
)
from vllm_llmd.ops.nvrtc import KERNEL_NAMES, compile_cubin
from vllm_llmd.ops.paged_cache import PagedKVCache

THREADS = 256  # per CTA: 8 warps, each thread moving 4 x 16 B per chunk step
CHUNK_BYTES = THREADS * 16 * 4  # bytes of a page one CTA copies per step
_MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z


@dataclass(frozen=True)
class LaunchGeometry:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    chunk_bytes: int


def launch_geometry(cache: PagedKVCache, num_ids: int) -> LaunchGeometry:
    """Grid over (page chunks, segments, block ids); the kernels loop past capped axes."""
    chunks = -(-cache.page_bytes // CHUNK_BYTES)
    grid = (chunks, min(cache.num_segments, _MAX_GRID_YZ), min(num_ids, _MAX_GRID_YZ))
    return LaunchGeometry(grid, (THREADS, 1, 1), CHUNK_BYTES)


def kernel_args(
    cache: PagedKVCache, ids_address: int, num_ids: int, chunk_bytes: int, buffer_address: int
) -> tuple[ctypes._SimpleCData, ...]:
    """The kernels' arguments, in order and in the C types of their signature."""
    return (
        ctypes.c_void_p(cache.base_table.data_ptr()),  # const unsigned long long*
        ctypes.c_int(cache.num_segments),
        ctypes.c_longlong(cache.block_stride),
        ctypes.c_longlong(cache.page_bytes),
        ctypes.c_void_p(ids_address),  # const long long*
        ctypes.c_int(num_ids),
        ctypes.c_longlong(chunk_bytes),
        ctypes.c_void_p(buffer_address),  # unsigned char*
    )


def between_args(
    src: PagedKVCache,
    src_ids_address: int,
    dst: PagedKVCache,
    dst_ids_address: int,
    num_ids: int,
    chunk_bytes: int,
) -> tuple[ctypes._SimpleCData, ...]:
    """llmd_copy_pages_between's arguments, in order and in the C types of its signature."""
    return (
        ctypes.c_void_p(src.base_table.data_ptr()),  # const unsigned long long*
        ctypes.c_longlong(src.block_stride),
        ctypes.c_void_p(src_ids_address),  # const long long*
        ctypes.c_void_p(dst.base_table.data_ptr()),
        ctypes.c_longlong(dst.block_stride),
        ctypes.c_void_p(dst_ids_address),
        ctypes.c_int(src.num_segments),
        ctypes.c_longlong(src.page_bytes),
        ctypes.c_int(num_ids),
        ctypes.c_longlong(chunk_bytes),
    )


def kernel_params(args: tuple[ctypes._SimpleCData, ...]) -> ctypes.Array:
    """cuLaunchKernel's kernelParams: the address of each argument (keep `args` alive)."""
    return (ctypes.c_void_p * len(args))(*(ctypes.addressof(arg) for arg in args))


class CudaKernels:
    """The compiled kernels, loaded in one device's primary context."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = _libcuda()
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        self.compiled = compile_cubin(f"{major}{minor}")
        self._context = retain_primary_context(self._cuda, index)
        module = ctypes.c_void_p()
        self._functions = {}
        with self._in_context():
            self._call("cuModuleLoadData", ctypes.byref(module), self.compiled.cubin)
            for name in KERNEL_NAMES:
                function = ctypes.c_void_p()
                self._call("cuModuleGetFunction", ctypes.byref(function), module, name.encode())
                self._functions[name] = function

    def copy(
        self, cache: PagedKVCache, ids: torch.Tensor, buffer: torch.Tensor, gather: bool
    ) -> None:
        """Enqueue one gather (cache -> buffer) or scatter on the current stream."""
        ids = ids.to(self.device, non_blocking=True)
        geometry = launch_geometry(cache, len(ids))
        name = KERNEL_NAMES[0] if gather else KERNEL_NAMES[1]
        with self._in_context():
            address = self._address(buffer)
            args = kernel_args(cache, ids.data_ptr(), len(ids), geometry.chunk_bytes, address)
            self._launch(name, geometry, args)
        # `ids` lives until the kernel has read it: freed on this stream, the caching
        # allocator reuses its memory only for work queued after the kernel.

    def copy_between(
        self, src: PagedKVCache, src_ids: torch.Tensor, dst: PagedKVCache, dst_ids: torch.Tensor
    ) -> None:
        """Enqueue one cache-to-cache copy (page to page) on the current stream."""
        src_ids = src_ids.to(self.device, non_blocking=True)
        dst_ids = dst_ids.to(self.device, non_blocking=True)
        geometry = launch_geometry(src, len(src_ids))
        args = between_args(
            src, src_ids.data_ptr(), dst, dst_ids.data_ptr(), len(src_ids), geometry.chunk_bytes
        )
        with self._in_context():
            self._launch(KERNEL_NAMES[2], geometry, args)

    def _launch(
        self, name: str, geometry: LaunchGeometry, args: tuple[ctypes._SimpleCData, ...]
    ) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._call(
            "cuLaunchKernel",
            self._functions[name],
            *geometry.grid,
            *geometry.block,
            0,  # dynamic shared memory
            ctypes.c_void_p(stream),
            kernel_params(args),
            None,
        )

    def _in_context(self) -> contextlib.AbstractContextManager[None]:
        return pushed_context(self._cuda, self._context)

    def _address(self, buffer: torch.Tensor) -> int:
        if buffer.device.type == "cuda":
            return buffer.data_ptr()
        address = ctypes.c_uint64()  # pinned host memory: its address as the device sees it
        self._call("cuMemHostGetDevicePointer_v2", ctypes.byref(address), buffer.data_ptr(), 0)
        return address.value

    def _call(self, name: str, *args: object) -> None:
        check_call(self._cuda, name, *args, device=self.device)


_KERNELS: dict[torch.device, CudaKernels | Exception] = {}
_LOCK = threading.Lock()


def kernels_for(device: torch.device) -> CudaKernels:
    """The device's kernels, compiled at first use. Raises the (cached) error if they can't be."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _LOCK:
        if device not in _KERNELS:
            try:
                _KERNELS[device] = CudaKernels(device)
            except Exception as err:  # any failure means: use the torch path
                _KERNELS[device] = err
        kernels = _KERNELS[device]
    if isinstance(kernels, Exception):
        raise kernels
    return kernels


def _libcuda() -> ctypes.CDLL:
    cuda = load_libcuda()
    cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p]
    cuda.cuLaunchKernel.argtypes += [ctypes.c_uint] * 6 + [ctypes.c_uint, ctypes.c_void_p]
    cuda.cuLaunchKernel.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
    cuda.cuModuleLoadData.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    cuda.cuModuleGetFunction.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
    cuda.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    return cuda
