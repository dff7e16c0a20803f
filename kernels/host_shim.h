// Makes copy_pages.cu build as plain host C++ (g++), so CI runs the kernels' logic without a
// GPU: `#include "host_shim.h"` before the .cu, then launch with llmd_host_launch().
//
// The kernels use no shared memory, barriers or warp functions, so running the threads of a
// CTA one after another gives the same result as running them in parallel.
#pragma once

#define __global__
#define __device__
#define __forceinline__ inline

// Aligned as CUDA's: the tests' -fsanitize=alignment then flags what a GPU would fault on.
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in indices, as thread-locals so tests may launch from several threads at once.
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// Runs every thread of every CTA of the grid in turn.
template <typename... Params, typename... Args>
inline void llmd_host_launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  gridDim = grid;
  blockDim = block;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx)
        for (unsigned int tz = 0; tz < block.z; ++tz)
          for (unsigned int ty = 0; ty < block.y; ++ty)
            for (unsigned int tx = 0; tx < block.x; ++tx) {
              blockIdx = dim3(bx, by, bz);
              threadIdx = dim3(tx, ty, tz);
              kernel(args...);
            }
}
