// Warp and block reductions of the CUDA kernels: butterfly shuffles within a warp, then one value per
// warp through shared memory.
#pragma once
#include <cuda_runtime.h>

namespace twicediff {
namespace cuda {

constexpr int kWarp = 32;

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return max(a, b); }
};

// op over the 32 lanes of a warp; every lane gets the result. Lane 0 combines its values in the same
// order as a shift-down tree would.
template <typename T, typename Op>
__device__ inline T warp_reduce(T v, Op op) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <typename T>
__device__ inline T warp_sum(T v) { return warp_reduce(v, Sum{}); }

template <typename T>
__device__ inline T warp_max(T v) { return warp_reduce(v, Max{}); }

// op over the kBlockThreads threads of a CUDA block (a multiple of kWarp, at most kWarp * kWarp);
// the result is valid in thread 0. `shared` holds kBlockThreads / kWarp values; `identity` fills
// the lanes of the last step that have no warp to stand for. Every thread of the block must call it.
template <int kBlockThreads, typename T, typename Op>
__device__ inline T block_reduce(T v, T identity, T* shared, Op op) {
  static_assert(kBlockThreads % kWarp == 0 && kBlockThreads <= kWarp * kWarp, "one warp must reduce the warps");
  v = warp_reduce(v, op);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kBlockThreads / kWarp ? shared[threadIdx.x] : identity;
  if (warp == 0) v = warp_reduce(v, op);
  __syncthreads();
  return v;
}

template <int kBlockThreads, typename T>
__device__ inline T block_sum(T v, T* shared) { return block_reduce<kBlockThreads>(v, T(0), shared, Sum{}); }

}  // namespace cuda
}  // namespace twicediff
