"""Compile kernels/copy_pages.cu to a CUBIN with NVRTC: the one compile, shared with CI.

The runtime (`cuda_copy.py`) and the tests call `compile_cubin`, so CI proves, without a GPU
and through the NVRTC library from PyPI (`nvidia-cuda-nvrtc`), the exact compile that runs
inside vLLM: same sources, same headers, same options.

Why not `torch.cuda._compile_kernel` / `torch.cuda._utils._nvrtc_compile` (torch 2.13):
they add `-I$CUDA_HOME/include` (raising where no CUDA toolkit is installed) and torch's
own nvcc flags, which CI cannot reproduce; they compile one kernel name per call; and the
launcher they return passes Python ints as 32-bit C ints, which would cut our pointers and
byte strides. We do use the NVRTC library torch loads (`_get_nvrtc_library`), so no extra
install is needed in a vLLM image. Nothing here imports torch at module level.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.resources
import os
import sys
from dataclasses import dataclass

KERNEL_PACKAGE = "vllm_llmd.kernels"
MAIN_SOURCE = "copy_pages.cu"
HEADERS = ("copy_pages.cuh",)  # the ones MAIN_SOURCE includes, handed to NVRTC by name
KERNEL_NAMES = ("llmd_gather_pages", "llmd_scatter_pages", "llmd_copy_pages_between")

_NVRTC_SUCCESS = 0


class NvrtcError(RuntimeError):
    """NVRTC could not be loaded or the kernels did not compile; the message has the log."""


@dataclass(frozen=True)
class CompiledKernels:
    cubin: bytes  # ELF image for one sm_XY, for cuModuleLoadData
    arch: str  # "90" for sm_90
    log: str  # NVRTC's log: empty unless it warned
    nvrtc_version: tuple[int, int]


def kernel_sources() -> tuple[str, dict[str, str]]:
    """(text of copy_pages.cu, {header name: text}) as shipped in the vllm_llmd.kernels package."""
    files = importlib.resources.files(KERNEL_PACKAGE)
    main = files.joinpath(MAIN_SOURCE).read_text(encoding="utf-8")
    headers = {name: files.joinpath(name).read_text(encoding="utf-8") for name in HEADERS}
    return main, headers


def nvrtc_options(arch: str) -> list[str]:
    """NVRTC options for a CUBIN of sm_<arch> (e.g. "90"); a real arch, so no JIT at load."""
    if not arch.isdigit():
        raise ValueError(f"arch must be the digits of sm_XY, e.g. '90'; got {arch!r}")
    return [f"--gpu-architecture=sm_{arch}", "--std=c++17"]


def find_libnvrtc() -> str | ctypes.CDLL:
    """The NVRTC library: the one torch's CUDA build loads, else one from a `nvidia-*` wheel.

    Returns a loaded CDLL (torch's) or a path to load. Raises NvrtcError naming the fix.
    """
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        try:
            from torch.cuda._utils import _get_nvrtc_library

            return _get_nvrtc_library()
        except (ImportError, OSError):
            pass  # a private helper: fall back to searching the wheels ourselves
    found = _wheel_libnvrtc_paths()
    if not found:
        raise NvrtcError(
            "no libnvrtc found: install torch with CUDA, or `pip install nvidia-cuda-nvrtc`"
        )
    return found[0]


def _wheel_libnvrtc_paths() -> list[str]:
    # nvidia-cuda-nvrtc (CUDA 13) ships nvidia/cu13/lib; -cu12 ships nvidia/cuda_nvrtc/lib.
    found: list[str] = []
    for root in sys.path:
        pattern = os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*[0-9]")
        found += sorted(glob.glob(pattern), reverse=True)
    return found


def load_libnvrtc(lib: str | ctypes.CDLL | None = None) -> ctypes.CDLL:
    """Load NVRTC from a path (or find it) and declare the C signatures we call."""
    if lib is None:
        lib = find_libnvrtc()
    if isinstance(lib, str):
        lib = _load_from_path(lib)
    c_size_p = ctypes.POINTER(ctypes.c_size_t)
    c_int_p = ctypes.POINTER(ctypes.c_int)
    prog_p = ctypes.POINTER(ctypes.c_void_p)
    strings = ctypes.POINTER(ctypes.c_char_p)
    signatures = {
        "nvrtcVersion": [c_int_p, c_int_p],
        "nvrtcGetErrorString": [ctypes.c_int],
        "nvrtcCreateProgram": [
            prog_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            *[strings] * 2,
        ],
        "nvrtcCompileProgram": [ctypes.c_void_p, ctypes.c_int, strings],
        "nvrtcGetProgramLogSize": [ctypes.c_void_p, c_size_p],
        "nvrtcGetProgramLog": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [ctypes.c_void_p, c_size_p],
        "nvrtcGetCUBIN": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcDestroyProgram": [prog_p],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _load_from_path(path: str) -> ctypes.CDLL:
    # libnvrtc dlopens libnvrtc-builtins by soname and the wheels set no rpath for it; loading
    # it first from the same folder makes that dlopen find it (as torch's preloading does).
    builtins = glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*[0-9]"))
    try:
        for builtin in builtins:
            ctypes.CDLL(builtin)
        return ctypes.CDLL(path)
    except OSError as err:
        raise NvrtcError(f"cannot load NVRTC from {path}: {err}") from err


def compile_cubin(arch: str, lib: str | ctypes.CDLL | None = None) -> CompiledKernels:
    """Compile the copy kernels for sm_<arch>. Raises NvrtcError with NVRTC's log on failure."""
    nvrtc = load_libnvrtc(lib)
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(nvrtc, nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    main, headers = kernel_sources()
    names = [name.encode() for name in headers]
    texts = [text.encode() for text in headers.values()]
    options = [option.encode() for option in nvrtc_options(arch)]

    prog = ctypes.c_void_p()
    _check(
        nvrtc,
        nvrtc.nvrtcCreateProgram(
            ctypes.byref(prog),
            main.encode(),
            MAIN_SOURCE.encode(),
            len(headers),
            (ctypes.c_char_p * len(texts))(*texts),
            (ctypes.c_char_p * len(names))(*names),
        ),
        "nvrtcCreateProgram",
    )
    try:
        result = nvrtc.nvrtcCompileProgram(
            prog, len(options), (ctypes.c_char_p * len(options))(*options)
        )
        log = _program_log(nvrtc, prog)
        if result != _NVRTC_SUCCESS:
            raise NvrtcError(f"NVRTC failed to compile {MAIN_SOURCE} for sm_{arch}:\n{log}")
        size = ctypes.c_size_t()
        _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return CompiledKernels(cubin.raw, arch, log, (major.value, minor.value))


def _program_log(nvrtc: ctypes.CDLL, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLog")
    text = ctypes.create_string_buffer(size.value)
    _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, text), "nvrtcGetProgramLog")
    return text.value.decode(errors="replace").strip()


def _check(nvrtc: ctypes.CDLL, result: int, call: str) -> None:
    if result != _NVRTC_SUCCESS:
        message = nvrtc.nvrtcGetErrorString(result) or b"unknown error"
        raise NvrtcError(f"{call} failed: {message.decode()} ({result})")
