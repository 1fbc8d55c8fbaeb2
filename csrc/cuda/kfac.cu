// CUDA kernels of the K-FAC ops (see kfac_common.h for what they compute): the chunking and the
// GEMMs (cuBLAS through ATen, on the current stream) are shared with the CPU; the CUDA part is the
// fused accumulation of per-sample squares, under a guard for out's device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "kfac_common.h"

namespace twicediff {
namespace {

constexpr int kThreads = 256;

// out[e] += Σ_k m[k, e]²: one thread per entry e of [O, I'] (grid-stride), consecutive threads on
// consecutive entries so that each sample's reads are coalesced.
template <typename T>
__global__ void square_sum_kernel(T* __restrict__ out, const T* __restrict__ m, int64_t n, int64_t O, int64_t Ip,
                                  int64_t s0, int64_t s1) {
  const int64_t E = O * Ip;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T acc = 0;
    for (int64_t k = 0; k < n; ++k) {
      const T v = m[k * E + e];
      acc += v * v;
    }
    const int64_t o = e / Ip, i = e % Ip;
    out[o * s0 + i * s1] += acc;
  }
}

void square_sum_cuda(const at::Tensor& out, const at::Tensor& m) {
  const int64_t n = m.size(0), O = m.size(1), Ip = m.size(2), E = O * Ip;
  if (E == 0 || n == 0) return;
  const int64_t blocks = std::min<int64_t>((E + kThreads - 1) / kThreads, 65535);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "kfac_square_sum_cuda", [&] {
    square_sum_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), n, O, Ip, out.stride(0), out.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void covariance_cuda(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weights, bool bias) {
  const c10::cuda::CUDAGuard guard(out.device());
  kfac::covariance(out, x, weights, bias);
}

void eigen_correction_cuda(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a, const at::Tensor& q_s,
                           const at::Tensor& q_a, const std::optional<at::Tensor>& weights, bool bias, int64_t chunk) {
  const c10::cuda::CUDAGuard guard(out.device());
  kfac::eigen_correction(out, g, a, q_s, q_a, weights, bias, chunk, square_sum_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) {
  m.impl("kfac_covariance_", &covariance_cuda);
  m.impl("kfac_eigen_correction_", &eigen_correction_cuda);
}

}  // namespace twicediff
