"""The four CUDA driver calls of the same-host IPC path, and nothing else.

`cuda_ipc.py` decides what to open and checks every number a peer sent; this module only
talks to the driver (ctypes on libcuda.so.1), so that the CPU tests can put a fake of
`IpcDriver` in its place while all the checks run for real:

- `allocation_range(ptr)`: base and size of the allocation holding ptr (cuMemGetAddressRange),
  the real extent a peer's description is checked against;
- `export_handle(base)`: cuIpcGetMemHandle of an allocation's base, 64 bytes;
- `open_handle(handle)`: cuIpcOpenMemHandle, the allocation's base as mapped here;
- `close_handle(ptr)`: cuIpcCloseMemHandle of what open_handle returned.

Only the handle reaches the driver: no size, offset or torch ref-counter file of the peer's
(torch's `_new_shared_cuda` takes those on trust; it is not used). Every call runs in the
device's primary context, the one torch uses, pushed and popped around it: the calling thread
(the side channel's) may have no current context, or another device's.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Protocol

import torch

from vllm_llmd.ops.libcuda import (
    check_call,
    load_libcuda,
    pushed_context,
    retain_primary_context,
)
from vllm_llmd.transfer.messages import CUDA_IPC_HANDLE_BYTES

# cuIpcOpenMemHandle flag: enable peer access to the owning GPU when it is another one.
_LAZY_ENABLE_PEER_ACCESS = 1


class IpcDriver(Protocol):
    """What the IPC path needs from CUDA (real: `CudaDriver`; tests: a CPU fake)."""

    def allocation_range(self, ptr: int, device: torch.device) -> tuple[int, int]:
        """(base, size in bytes) of the allocation that holds address ptr."""
        ...

    def export_handle(self, base: int, device: torch.device) -> bytes:
        """The IPC handle of the allocation starting at base."""
        ...

    def open_handle(self, handle: bytes, device: torch.device) -> int:
        """Map a peer's allocation into device's context; its base address here."""
        ...

    def close_handle(self, ptr: int, device: torch.device) -> None:
        """Unmap what open_handle returned."""
        ...


class _CUipcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * CUDA_IPC_HANDLE_BYTES)]


class CudaDriver:
    """`IpcDriver` on the CUDA driver API. Thread-safe (the driver is)."""

    def __init__(self) -> None:
        self._cuda = _libcuda()
        self._call("cuInit", 0)
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()

    def allocation_range(self, ptr: int, device: torch.device) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        with self._in_context(device):
            self._call(
                "cuMemGetAddressRange_v2",
                ctypes.byref(base),
                ctypes.byref(size),
                ctypes.c_uint64(ptr),
            )
        return base.value, size.value

    def export_handle(self, base: int, device: torch.device) -> bytes:
        handle = _CUipcMemHandle()
        with self._in_context(device):
            self._call("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(base))
        return ctypes.string_at(ctypes.addressof(handle), CUDA_IPC_HANDLE_BYTES)

    def open_handle(self, handle: bytes, device: torch.device) -> int:
        if len(handle) != CUDA_IPC_HANDLE_BYTES:  # checked before; the struct copy relies on it
            raise ValueError(
                f"a CUDA IPC handle has {CUDA_IPC_HANDLE_BYTES} bytes, not {len(handle)}"
            )
        ipc_handle = _CUipcMemHandle()
        ctypes.memmove(ctypes.addressof(ipc_handle), handle, CUDA_IPC_HANDLE_BYTES)
        ptr = ctypes.c_uint64()
        with self._in_context(device):
            self._call(
                "cuIpcOpenMemHandle_v2", ctypes.byref(ptr), ipc_handle, _LAZY_ENABLE_PEER_ACCESS
            )
        return ptr.value

    def close_handle(self, ptr: int, device: torch.device) -> None:
        with self._in_context(device):
            self._call("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))

    def _in_context(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        return pushed_context(self._cuda, self._primary_context(device))

    def _primary_context(self, device: torch.device) -> ctypes.c_void_p:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            if index not in self._contexts:
                # retained for the life of the process, as torch's runtime does
                self._contexts[index] = retain_primary_context(self._cuda, index)
            return self._contexts[index]

    def _call(self, name: str, *args: object) -> None:
        check_call(self._cuda, name, *args)


def _libcuda() -> ctypes.CDLL:
    cuda = load_libcuda()
    u64, ptr = ctypes.c_uint64, ctypes.c_void_p
    cuda.cuInit.argtypes = [ctypes.c_uint]
    cuda.cuMemGetAddressRange_v2.argtypes = [ptr, ptr, u64]
    cuda.cuIpcGetMemHandle.argtypes = [ptr, u64]
    # the handle goes by value: a 64-byte struct
    cuda.cuIpcOpenMemHandle_v2.argtypes = [ptr, _CUipcMemHandle, ctypes.c_uint]
    cuda.cuIpcCloseMemHandle.argtypes = [u64]
    return cuda
