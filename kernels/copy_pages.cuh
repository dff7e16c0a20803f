// Device helpers of the page copy kernels (copy_pages.cu).
//
// No C++ standard header is included on purpose: NVRTC has none by default, and the same text
// must also build as plain host C++ through host_shim.h so CI can run the kernels on a CPU.
#pragma once

namespace llmd {

typedef unsigned char u8;
typedef unsigned long long u64;
typedef long long i64;

// Copies n bytes from src to dst, spread over nthreads threads. dst and src must be congruent
// modulo sizeof(Word): the unaligned head and the tail go byte by byte, the rest in Words.
template <typename Word>
__device__ __forceinline__ void copy_words(u8* __restrict__ dst, const u8* __restrict__ src,
                                           i64 n, i64 tid, i64 nthreads) {
  const i64 width = (i64)sizeof(Word);
  i64 head = (width - (i64)((u64)src & (u64)(width - 1))) & (width - 1);
  if (head > n) head = n;
  for (i64 k = tid; k < head; k += nthreads) dst[k] = src[k];

  const i64 num_words = (n - head) / width;
  const Word* __restrict__ s = (const Word*)(src + head);
  Word* __restrict__ d = (Word*)(dst + head);
  // Four loads in flight per thread before the stores: one word at a time leaves the link idle.
  i64 k = tid;
  for (; k + 3 * nthreads < num_words; k += 4 * nthreads) {
    const Word w0 = s[k];
    const Word w1 = s[k + nthreads];
    const Word w2 = s[k + 2 * nthreads];
    const Word w3 = s[k + 3 * nthreads];
    d[k] = w0;
    d[k + nthreads] = w1;
    d[k + 2 * nthreads] = w2;
    d[k + 3 * nthreads] = w3;
  }
  for (; k < num_words; k += nthreads) d[k] = s[k];

  for (k = head + num_words * width + tid; k < n; k += nthreads) dst[k] = src[k];
}

// The widest access both pointers allow: 16 B (uint4) when they agree modulo 16, narrower
// otherwise. Pages are usually 16 B aligned; odd offsets and sizes still copy correctly.
__device__ __forceinline__ void copy_span(u8* __restrict__ dst, const u8* __restrict__ src,
                                          i64 n, i64 tid, i64 nthreads) {
  const u64 skew = (u64)dst ^ (u64)src;
  if ((skew & 15) == 0) {
    copy_words<uint4>(dst, src, n, tid, nthreads);
  } else if ((skew & 7) == 0) {
    copy_words<uint2>(dst, src, n, tid, nthreads);
  } else if ((skew & 3) == 0) {
    copy_words<unsigned int>(dst, src, n, tid, nthreads);
  } else if ((skew & 1) == 0) {
    copy_words<unsigned short>(dst, src, n, tid, nthreads);
  } else {
    copy_words<u8>(dst, src, n, tid, nthreads);
  }
}

// One grid covers (bytes of a page, segment, block id) on (x, y, z). Each axis loops with the
// grid's stride, so the launcher may cap any of them (gridDim.y and .z stop at 65535).
//
// Buffer order: the page of segment s for the i-th block id sits at (i * num_segments + s) *
// page_bytes, so the bytes of one block id, across all layers, are consecutive.
template <bool kGather>
__device__ __forceinline__ void copy_pages(const u64* __restrict__ segment_bases,
                                           int num_segments, i64 block_stride, i64 page_bytes,
                                           const i64* __restrict__ block_ids, int num_ids,
                                           i64 chunk_bytes, u8* __restrict__ buffer) {
  const i64 chunk_step = (i64)gridDim.x * chunk_bytes;
  for (i64 i = blockIdx.z; i < num_ids; i += gridDim.z) {
    const i64 block = block_ids[i];
    for (i64 s = blockIdx.y; s < num_segments; s += gridDim.y) {
      u8* page = (u8*)segment_bases[s] + block * block_stride;
      u8* slot = buffer + (i * num_segments + s) * page_bytes;
      for (i64 c = (i64)blockIdx.x * chunk_bytes; c < page_bytes; c += chunk_step) {
        const i64 n = page_bytes - c < chunk_bytes ? page_bytes - c : chunk_bytes;
        if (kGather) {
          copy_span(slot + c, page + c, n, threadIdx.x, blockDim.x);
        } else {
          copy_span(page + c, slot + c, n, threadIdx.x, blockDim.x);
        }
      }
    }
  }
}

// Cache to cache, page to page (one pass, no buffer): the page of segment s of dst_ids[i] in
// the destination becomes that of src_ids[i] in the source. Both caches have one layout (the
// same segments and page size); their block strides may differ. Grid as copy_pages.
__device__ __forceinline__ void copy_pages_between(
    const u64* __restrict__ src_bases, i64 src_stride, const i64* __restrict__ src_ids,
    const u64* __restrict__ dst_bases, i64 dst_stride, const i64* __restrict__ dst_ids,
    int num_segments, i64 page_bytes, int num_ids, i64 chunk_bytes) {
  const i64 chunk_step = (i64)gridDim.x * chunk_bytes;
  for (i64 i = blockIdx.z; i < num_ids; i += gridDim.z) {
    const i64 src_block = src_ids[i];
    const i64 dst_block = dst_ids[i];
    for (i64 s = blockIdx.y; s < num_segments; s += gridDim.y) {
      const u8* src = (const u8*)src_bases[s] + src_block * src_stride;
      u8* dst = (u8*)dst_bases[s] + dst_block * dst_stride;
      for (i64 c = (i64)blockIdx.x * chunk_bytes; c < page_bytes; c += chunk_step) {
        const i64 n = page_bytes - c < chunk_bytes ? page_bytes - c : chunk_bytes;
        copy_span(dst + c, src + c, n, threadIdx.x, blockDim.x);
      }
    }
  }
}

}  // namespace llmd
