"""Block copies between paged KV caches and contiguous buffers: one entry point, two paths.

CUDA kernels from kernels/ (compiled at run time) on GPU; a vectorised torch path on CPU.
"""
