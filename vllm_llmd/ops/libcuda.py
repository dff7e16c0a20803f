"""The CUDA driver library (libcuda.so.1 through ctypes), as the kernels and the IPC path use it.

One loader that declares the argument types of the calls both make, one checked call that
turns a CUresult into a RuntimeError naming the call and the driver's message, and one
push/pop of a context around a block of calls. `vllm_llmd.ops.cuda_copy` (kernel launches) and
`vllm_llmd.transfer.cuda_driver` (IPC handles) build on it; each declares its own other calls.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch


def load_libcuda() -> ctypes.CDLL:
    """libcuda.so.1, with the argument types of the context and device calls declared."""
    cuda = ctypes.CDLL("libcuda.so.1")
    ptr = ctypes.c_void_p
    cuda.cuDeviceGet.argtypes = [ptr, ctypes.c_int]
    cuda.cuDevicePrimaryCtxRetain.argtypes = [ptr, ctypes.c_int]
    cuda.cuCtxPushCurrent_v2.argtypes = [ptr]
    cuda.cuCtxPopCurrent_v2.argtypes = [ptr]
    cuda.cuGetErrorString.argtypes = [ctypes.c_int, ptr]
    return cuda


def check_call(
    cuda: ctypes.CDLL, name: str, *args: object, device: torch.device | None = None
) -> None:
    """Call the driver function `name`; raise RuntimeError with its error text if it fails."""
    result = getattr(cuda, name)(*args)
    if result != 0:
        message = ctypes.c_char_p()
        cuda.cuGetErrorString(result, ctypes.byref(message))
        text = message.value.decode() if message.value else "unknown error"
        where = f" on {device}" if device is not None else ""
        raise RuntimeError(f"{name} failed{where}: {text} ({result})")


def retain_primary_context(cuda: ctypes.CDLL, index: int) -> ctypes.c_void_p:
    """Device index's primary context (the one torch uses), retained for the process's life."""
    cu_device, context = ctypes.c_int(), ctypes.c_void_p()
    check_call(cuda, "cuDeviceGet", ctypes.byref(cu_device), index)
    check_call(cuda, "cuDevicePrimaryCtxRetain", ctypes.byref(context), cu_device)
    return context


@contextlib.contextmanager
def pushed_context(cuda: ctypes.CDLL, context: ctypes.c_void_p) -> Iterator[None]:
    """Run the block with `context` current on this thread, then restore what was before.

    Pushed, then popped: the calling thread may have no current context yet, or another
    device's, which torch's runtime calls on this thread must find again afterwards."""
    check_call(cuda, "cuCtxPushCurrent_v2", context)
    try:
        yield
    finally:
        check_call(cuda, "cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))
