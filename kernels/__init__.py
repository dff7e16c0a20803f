"""CUDA C++ sources of vllm-llmd's copy kernels, shipped as package data.

They are compiled at run time (NVRTC) by `vllm_llmd.ops`; nothing here is built at install.
"""
