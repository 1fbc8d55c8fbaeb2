// CUDA kernels of the fused solver steps on [D, P] blocks (one row per right-hand side): a 2-d
// grid, blockIdx.y walks rows and blockIdx.x strides over the row's columns; per-row reductions
// are float64, reduced in shared memory and combined across CUDA blocks with atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <math_constants.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "solver_step_common.h"
#include "util/cuda_reduce.cuh"

namespace twicediff {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxRowBlocks = 65535;  // gridDim.y limit; kernels loop over further rows

dim3 grid_for(int64_t D, int64_t P) {
  // Enough CUDA blocks per row to cover it with ~4 elements per thread, at most 128.
  const int64_t per_row = std::min<int64_t>(128, std::max<int64_t>(1, (P + kThreads * 4 - 1) / (kThreads * 4)));
  return dim3(static_cast<unsigned>(per_row), static_cast<unsigned>(std::min(D, kMaxRowBlocks)));
}

// The max of non-negative values or NaN, NaN winning.
__device__ double nonneg_max(double a, double b) { return (isnan(a) || a > b) ? a : b; }

struct NonnegMax {
  __device__ double operator()(double a, double b) const { return nonneg_max(a, b); }
};

// For non-negative doubles (and NaN, whose bits exceed +inf's), the bit patterns order like the values.
__device__ void atomic_nonneg_max(double* addr, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

template <typename T>
__global__ void cg_step_kernel(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p, const T* __restrict__ Ap,
                               const double* __restrict__ alpha, double* __restrict__ rr, int64_t D, int64_t P,
                               int64_t x0, int64_t x1, int64_t r0, int64_t r1, int64_t p0, int64_t p1, int64_t q0,
                               int64_t q1) {
  __shared__ double shared[kThreads / cuda::kWarp];
  for (int64_t d = blockIdx.y; d < D; d += gridDim.y) {
    const T a = static_cast<T>(alpha[d]);
    double acc = 0.0;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < P;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      x[d * x0 + j * x1] += a * p[d * p0 + j * p1];
      const T rj = r[d * r0 + j * r1] - a * Ap[d * q0 + j * q1];
      r[d * r0 + j * r1] = rj;
      acc += static_cast<double>(rj) * static_cast<double>(rj);
    }
    acc = cuda::block_sum<kThreads>(acc, shared);  // valid in thread 0
    if (threadIdx.x == 0) atomicAdd(rr + d, acc);
  }
}

template <typename T>
__global__ void cg_direction_kernel(T* __restrict__ p, const T* __restrict__ z, const double* __restrict__ beta,
                                    int64_t D, int64_t P, int64_t p0, int64_t p1, int64_t z0, int64_t z1) {
  for (int64_t d = blockIdx.y; d < D; d += gridDim.y) {
    const T b = static_cast<T>(beta[d]);
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < P;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      p[d * p0 + j * p1] = z[d * z0 + j * z1] + b * p[d * p0 + j * p1];
  }
}

template <typename T>
__global__ void lissa_step_kernel(T* __restrict__ h, const T* __restrict__ b, const T* __restrict__ Hh, T keep,
                                  T inv_scale, double* __restrict__ max_rel, double* __restrict__ sum_rel, int64_t D,
                                  int64_t P, int64_t h0, int64_t h1, int64_t b0, int64_t b1, int64_t a0, int64_t a1) {
  __shared__ double shared[kThreads / cuda::kWarp];
  for (int64_t d = blockIdx.y; d < D; d += gridDim.y) {
    double row_max = 0.0, row_sum = 0.0;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < P;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const T old = h[d * h0 + j * h1];
      const T fresh = b[d * b0 + j * b1] + keep * old - inv_scale * Hh[d * a0 + j * a1];
      h[d * h0 + j * h1] = fresh;
      const double delta = fabs(static_cast<double>(fresh) - static_cast<double>(old));
      const double rel = delta == 0.0 ? 0.0 : delta / fabs(static_cast<double>(fresh));
      if (!isfinite(static_cast<double>(fresh))) {
        row_max = CUDART_NAN;
        row_sum = CUDART_NAN;
      } else {
        row_max = nonneg_max(row_max, rel);
        row_sum += rel;
      }
    }
    row_max = cuda::block_reduce<kThreads>(row_max, 0.0, shared, NonnegMax{});  // valid in thread 0
    row_sum = cuda::block_sum<kThreads>(row_sum, shared);
    if (threadIdx.x == 0) {
      atomic_nonneg_max(max_rel + d, row_max);
      atomicAdd(sum_rel + d, row_sum);
    }
  }
}

at::Tensor cg_step_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                        const at::Tensor& alpha) {
  check_solver_blocks("cg_step", {{"x", &x}, {"r", &r}, {"p", &p}, {"Ap", &Ap}}, 2);
  check_row_coefficients("cg_step", "alpha", alpha, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t D = x.size(0), P = x.size(1);
  at::Tensor rr = at::zeros({D}, x.options().dtype(at::kDouble));
  if (D == 0 || P == 0) return rr;
  const at::Tensor a = alpha.contiguous();
  const dim3 grid = grid_for(D, P);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cuda", [&] {
    cg_step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), Ap.data_ptr<scalar_t>(),
        a.data_ptr<double>(), rr.data_ptr<double>(), D, P, x.stride(0), x.stride(1), r.stride(0), r.stride(1),
        p.stride(0), p.stride(1), Ap.stride(0), Ap.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rr;
}

void cg_direction_cuda(const at::Tensor& p, const at::Tensor& z, const at::Tensor& beta) {
  check_solver_blocks("cg_direction", {{"p", &p}, {"z", &z}}, 1);
  check_row_coefficients("cg_direction", "beta", beta, p);
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t D = p.size(0), P = p.size(1);
  if (D == 0 || P == 0) return;
  const at::Tensor bt = beta.contiguous();
  const dim3 grid = grid_for(D, P);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_cuda", [&] {
    cg_direction_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), bt.data_ptr<double>(), D, P, p.stride(0), p.stride(1),
        z.stride(0), z.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> lissa_step_cuda(const at::Tensor& h, const at::Tensor& b, const at::Tensor& Hh,
                                                   double dampen, double scale, double hessian_perturbation) {
  check_solver_blocks("lissa_step", {{"h", &h}, {"b", &b}, {"Hh", &Hh}}, 1);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0, "lissa_step: scale must be finite and non-zero, got ", scale);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t D = h.size(0), P = h.size(1);
  at::Tensor max_rel = at::zeros({D}, h.options().dtype(at::kDouble));
  at::Tensor sum_rel = at::zeros({D}, h.options().dtype(at::kDouble));
  if (D == 0 || P == 0) return {max_rel, sum_rel};
  const dim3 grid = grid_for(D, P);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lissa_step_cuda", [&] {
    lissa_step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        h.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), Hh.data_ptr<scalar_t>(),
        static_cast<scalar_t>(1.0 - dampen - hessian_perturbation / scale), static_cast<scalar_t>(1.0 / scale),
        max_rel.data_ptr<double>(), sum_rel.data_ptr<double>(), D, P, h.stride(0), h.stride(1), b.stride(0),
        b.stride(1), Hh.stride(0), Hh.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {max_rel, sum_rel};
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) {
  m.impl("cg_step", &cg_step_cuda);
  m.impl("cg_direction", &cg_direction_cuda);
  m.impl("lissa_step", &lissa_step_cuda);
}

}  // namespace twicediff
