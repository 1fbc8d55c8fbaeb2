// CUDA kernels of mlp_hvp: the elementwise passes of the R-operator (see mlp_hvp_driver.h for the
// driver and the layout). GEMMs go through ATen (cuBLAS); float16 / bfloat16 inputs are computed
// in float32 by the driver, so the kernels see float or double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "gemm_common.h"
#include "mlp_hvp_driver.h"
#include "util/cuda_reduce.cuh"

namespace twicediff {
namespace mlp_hvp {
namespace {

using cuda::kWarp;
using cuda::warp_max;
using cuda::warp_sum;

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t work, int per_block = kThreads) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 16));
}

template <typename T>
__global__ void forward_activation_kernel(const T* __restrict__ a, ActivationChain chain, T* __restrict__ h,
                                          T* __restrict__ s1, T* __restrict__ s2, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    T y, d1, d2;
    chain_derivatives<T>(chain, a[i], y, d1, d2);
    h[i] = y;
    s1[i] = d1;
    if (s2) s2[i] = d2;
  }
}

// One warp per row of z [N, C]: softmax (CE) or sigmoid (BCE) into p, and g = dL/dz.
template <typename T>
__global__ void loss_forward_kernel(const T* __restrict__ z, const T* __restrict__ y, const int64_t* __restrict__ t,
                                    T* __restrict__ p, T* __restrict__ g, int64_t N, int64_t C, int loss, T scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t n = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; n < N; n += warps) {
    const T* zr = z + n * C;
    if (loss == kCrossEntropy) {
      T m = -INFINITY;
      for (int64_t c = lane; c < C; c += kWarp) m = max(m, zr[c]);
      m = warp_max(m);
      T sum = 0;
      for (int64_t c = lane; c < C; c += kWarp) sum += exp(zr[c] - m);
      sum = warp_sum(sum);
      const int64_t target = t[n];
      for (int64_t c = lane; c < C; c += kWarp) {
        const T pc = exp(zr[c] - m) / sum;
        p[n * C + c] = pc;
        if (g) g[n * C + c] = scale * (pc - T(c == target));
      }
    } else {
      for (int64_t c = lane; c < C; c += kWarp) {
        if (loss == kBCEWithLogits) {
          const T s = T(1) / (T(1) + exp(-zr[c]));
          p[n * C + c] = s;
          if (g) g[n * C + c] = scale * (s - y[n * C + c]);
        } else if (g) {
          g[n * C + c] = scale * (zr[c] - y[n * C + c]);
        }
      }
    }
  }
}

// One warp per (n, d) row of rz [N*D, C]: rg = H_loss(n) rz.
template <typename T>
__global__ void loss_curvature_kernel(const T* __restrict__ rz, const T* __restrict__ p, T* __restrict__ rg,
                                      int64_t rows, int64_t D, int64_t C, int loss, T scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; row < rows; row += warps) {
    const T* r = rz + row * C;
    T* o = rg + row * C;
    const T* pr = p ? p + (row / D) * C : nullptr;
    if (loss == kCrossEntropy) {
      T dot = 0;
      for (int64_t c = lane; c < C; c += kWarp) dot += pr[c] * r[c];
      dot = warp_sum(dot);
      for (int64_t c = lane; c < C; c += kWarp) o[c] = scale * pr[c] * (r[c] - dot);
    } else if (loss == kBCEWithLogits) {
      for (int64_t c = lane; c < C; c += kWarp) o[c] = scale * pr[c] * (T(1) - pr[c]) * r[c];
    } else {
      for (int64_t c = lane; c < C; c += kWarp) o[c] = scale * r[c];
    }
  }
}

template <typename T>
__global__ void backward_activation_kernel(const T* __restrict__ gh, const T* __restrict__ s1,
                                           const T* __restrict__ s2, T* __restrict__ ga, T* __restrict__ s2gh,
                                           int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    ga[i] = s1[i] * gh[i];
    if (s2 && s2gh) s2gh[i] = s2[i] * gh[i];
  }
}

// rh [N, D, W] = s1[n] * ra (rh may be ra).
template <typename T>
__global__ void rforward_activation_kernel(const T* ra, const T* __restrict__ s1, T* rh, int64_t total, int64_t D,
                                           int64_t W) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i % W, n = i / (W * D);
    rh[i] = s1[n * W + o] * ra[i];
  }
}

// rg [N, D, W] = s1[n] * rg + s2gh[n] * ra.
template <typename T>
__global__ void rbackward_activation_kernel(T* __restrict__ rg, const T* __restrict__ s1,
                                            const T* __restrict__ s2gh, const T* __restrict__ ra, int64_t total,
                                            int64_t D, int64_t W) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i % W, n = i / (W * D);
    T g = s1[n * W + o] * rg[i];
    if (s2gh) g += s2gh[n * W + o] * ra[i];
    rg[i] = g;
  }
}

struct CudaKernels {
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }
  static c10::cuda::CUDAGuard device_guard(at::Device device) { return c10::cuda::CUDAGuard(device); }
  // CUDA's caching allocator already reuses the blocks.
  static constexpr bool kCacheScratch = false;
  // cuBLAS takes either operand transposed at no cost; the transposing write would be extra traffic.
  static bool weight_grad_input_major(at::ScalarType) { return false; }
  // One R-pass over all directions: the GPU runs each GEMM across its whole width.
  static int64_t direction_parts(int64_t) { return 1; }
  // Every direction in one R-pass: wider GEMMs fill more of the GPU.
  static int64_t directions_per_pass(int64_t D, int64_t) { return D; }
  // Nothing per thread to carry (one part, run by the calling thread).
  static int caller_settings() { return 0; }
  static int in_worker(int) { return 0; }
  // No fused output-layer pass: that is a CPU cache measure; here its work stays in cuBLAS GEMMs.
  static constexpr bool kFusedHead = false;
  // cuBLAS through ATen.
  static void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
    aten_gemm(out, a, b, beta);
  }

  static void forward_activation(const at::Tensor& a, const ActivationChain& chain, at::Tensor& h, at::Tensor& s1,
                                 at::Tensor& s2) {
    const int64_t n = a.numel();
    if (n == 0) return;
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_activation", [&] {
      forward_activation_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
          a.const_data_ptr<scalar_t>(), chain, h.mutable_data_ptr<scalar_t>(), s1.mutable_data_ptr<scalar_t>(),
          s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void loss_forward(const at::Tensor& z, const at::Tensor& target, const Plan& plan, at::Tensor& prob,
                           at::Tensor& g) {
    const int64_t N = z.size(0), C = z.size(1);
    if (N == 0 || C == 0) return;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_hvp_loss_forward", [&] {
      const bool ce = plan.loss == kCrossEntropy;
      loss_forward_kernel<scalar_t><<<blocks_for(N, kThreads / kWarp), kThreads, 0, stream()>>>(
          z.const_data_ptr<scalar_t>(), ce ? nullptr : target.const_data_ptr<scalar_t>(),
          ce ? target.const_data_ptr<int64_t>() : nullptr, prob.defined() ? prob.mutable_data_ptr<scalar_t>() : nullptr,
          g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr, N, C, static_cast<int>(plan.loss),
          static_cast<scalar_t>(plan.scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void loss_curvature(const at::Tensor& rz, const at::Tensor& z, const at::Tensor& prob, const Plan& plan,
                             at::Tensor& rg, int64_t D) {
    const int64_t C = z.size(1), rows = z.size(0) * D;
    if (rows == 0 || C == 0) return;
    AT_DISPATCH_FLOATING_TYPES(rz.scalar_type(), "mlp_hvp_loss_curvature", [&] {
      loss_curvature_kernel<scalar_t><<<blocks_for(rows, kThreads / kWarp), kThreads, 0, stream()>>>(
          rz.const_data_ptr<scalar_t>(), prob.defined() ? prob.const_data_ptr<scalar_t>() : nullptr,
          rg.mutable_data_ptr<scalar_t>(), rows, D, C, static_cast<int>(plan.loss), static_cast<scalar_t>(plan.scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward_activation(const at::Tensor& gh, const at::Tensor& s1, const at::Tensor& s2, at::Tensor& ga,
                                  at::Tensor& s2gh) {
    const int64_t n = gh.numel();
    if (n == 0) return;
    AT_DISPATCH_FLOATING_TYPES(gh.scalar_type(), "mlp_hvp_backward_activation", [&] {
      backward_activation_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
          gh.const_data_ptr<scalar_t>(), s1.const_data_ptr<scalar_t>(),
          s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr, ga.mutable_data_ptr<scalar_t>(),
          s2gh.defined() ? s2gh.mutable_data_ptr<scalar_t>() : nullptr, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void rforward_activation(const at::Tensor& ra, const at::Tensor& s1, at::Tensor& rh, int64_t D) {
    const int64_t total = ra.numel();
    if (total == 0) return;
    const int64_t W = ra.size(1) / D;
    AT_DISPATCH_FLOATING_TYPES(ra.scalar_type(), "mlp_hvp_rforward_activation", [&] {
      rforward_activation_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream()>>>(
          ra.const_data_ptr<scalar_t>(), s1.const_data_ptr<scalar_t>(), rh.mutable_data_ptr<scalar_t>(), total, D, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void rbackward_activation(at::Tensor& rg, const at::Tensor& s1, const at::Tensor& s2gh, const at::Tensor& ra,
                                   int64_t D, const at::Tensor& bias_out) {
    const int64_t total = rg.numel();
    if (total == 0) return;
    const int64_t W = rg.size(1) / D;
    AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "mlp_hvp_rbackward_activation", [&] {
      rbackward_activation_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream()>>>(
          rg.mutable_data_ptr<scalar_t>(), s1.const_data_ptr<scalar_t>(),
          s2gh.defined() ? s2gh.const_data_ptr<scalar_t>() : nullptr, ra.const_data_ptr<scalar_t>(), total, D, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (bias_out.defined()) column_sums(rg, bias_out, D);
  }

  // out[d, o] = sum_n m[n, d*W + o] by ATen's tree reduction: a thread per column summing all N
  // rows in turn would leave most of the GPU idle when D*W is small and N large (bias sums).
  static void column_sums(const at::Tensor& m, const at::Tensor& out, int64_t D) {
    if (m.size(1) == 0) return;
    out.copy_(m.sum(0).view({D, m.size(1) / D}));
  }
};

}  // namespace
}  // namespace mlp_hvp

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) { m.impl("mlp_hvp", &mlp_hvp::mlp_hvp_op<mlp_hvp::CudaKernels>); }

}  // namespace twicediff
