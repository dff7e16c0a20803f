// Block copies between a paged KV cache and one contiguous buffer, or between two paged caches
// of one layout, for many blocks of many layers in one launch. Compiled at run time by vllm_llmd/ops/nvrtc.py; built as host C++ by
// the tests (through host_shim.h) and by nvcc for sm_80/sm_90 with warnings as errors.
//
// A "segment" is one layer's pages (or, for layouts where a block of a layer is not one
// contiguous range, one contiguous run of it): block b of segment s starts at
// segment_bases[s] + b * block_stride and is page_bytes long. segment_bases are device-visible
// addresses; buffer is device memory or pinned host memory (its device-visible address).
// Launch (vllm_llmd/ops/cuda_copy.py): blockDim = (threads, 1, 1); grid =
// (ceil(page_bytes / chunk_bytes), min(num_segments, 65535), min(num_ids, 65535)). Any grid,
// thread count and chunk size copy correctly; a multiple of 32 threads and a chunk of
// threads * 64 bytes give each thread four 16-byte words per step.
#include "copy_pages.cuh"

// gather: buffer[i][s][:] = page of segment s for block_ids[i]
extern "C" __global__ void llmd_gather_pages(const unsigned long long* segment_bases,
                                             int num_segments, long long block_stride,
                                             long long page_bytes, const long long* block_ids,
                                             int num_ids, long long chunk_bytes,
                                             unsigned char* buffer) {
  llmd::copy_pages<true>(segment_bases, num_segments, block_stride, page_bytes, block_ids,
                         num_ids, chunk_bytes, buffer);
}

// scatter: page of segment s for block_ids[i] = buffer[i][s][:]; block_ids must be distinct
extern "C" __global__ void llmd_scatter_pages(const unsigned long long* segment_bases,
                                              int num_segments, long long block_stride,
                                              long long page_bytes, const long long* block_ids,
                                              int num_ids, long long chunk_bytes,
                                              unsigned char* buffer) {
  llmd::copy_pages<false>(segment_bases, num_segments, block_stride, page_bytes, block_ids,
                          num_ids, chunk_bytes, buffer);
}

// cache to cache: page of segment s for dst_ids[i] in the destination = page of segment s for
// src_ids[i] in the source (e.g. a peer's cache opened through CUDA IPC); dst_ids distinct
extern "C" __global__ void llmd_copy_pages_between(
    const unsigned long long* src_bases, long long src_stride, const long long* src_ids,
    const unsigned long long* dst_bases, long long dst_stride, const long long* dst_ids,
    int num_segments, long long page_bytes, int num_ids, long long chunk_bytes) {
  llmd::copy_pages_between(src_bases, src_stride, src_ids, dst_bases, dst_stride, dst_ids,
                           num_segments, page_bytes, num_ids, chunk_bytes);
}
