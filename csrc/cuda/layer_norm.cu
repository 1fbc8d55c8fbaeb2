// CUDA kernels of the LayerNorm tangent ops (what they compute: python/twicediff/ops/reference.py;
// checks and shapes: layer_norm_common.h). One warp per (direction, row): its lanes stride over the
// row's d features, sum with shuffles, then write the row. The weight and bias tangents of the
// backward are column sums over rows, taken by a second kernel (one thread per direction and
// feature, rows in order) so that results do not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "layer_norm_common.h"

namespace twicediff {
namespace {

using layer_norm::ptr_or_null;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1 << 30));
}

template <typename T, typename A>
__global__ void tangent_kernel(const T* __restrict__ X, const T* __restrict__ H, const T* __restrict__ RS,
                               const T* __restrict__ W, const T* __restrict__ WT, const T* __restrict__ BT,
                               T* __restrict__ O, int64_t B, int64_t R, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = B * R, stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; i < rows; i += stride) {
    const int64_t b = i / R, r = i % R;
    const T* h = H + r * d;
    T* o = O + i * d;
    A m1 = 0, m2 = 0;
    if (X) {
      const T* x = X + i * d;
      for (int64_t j = lane; j < d; j += kWarp) {
        m1 += A(x[j]);
        m2 += A(h[j]) * A(x[j]);
      }
      m1 = warp_sum(m1) / A(d);
      m2 = warp_sum(m2) / A(d);
    }
    const A rs = RS[r];
    for (int64_t j = lane; j < d; j += kWarp) {
      A v = 0;
      if (X) v = rs * (A(X[i * d + j]) - m1 - A(h[j]) * m2) * (W ? A(W[j]) : A(1));
      if (WT) v += A(WT[b * d + j]) * A(h[j]);
      if (BT) v += A(BT[b * d + j]);
      o[j] = T(v);
    }
  }
}

// grad_x_t per row, and the row's x_t means (mean(x_t), mean(xhat * x_t)) into XS [B, R, 2] for the
// column sums.
template <typename T, typename A>
__global__ void backward_tangent_kernel(const T* __restrict__ GY, const T* __restrict__ GYT, const T* __restrict__ X,
                                        const T* __restrict__ H, const T* __restrict__ RS, const T* __restrict__ W,
                                        const T* __restrict__ WT, const T* __restrict__ G, const T* __restrict__ ST,
                                        T* __restrict__ O, A* __restrict__ XS, int64_t B, int64_t R, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = B * R, stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; i < rows; i += stride) {
    const int64_t b = i / R, r = i % R;
    const T *h = H + r * d, *g = G + r * d, *gy = GY + r * d;
    const A rs = RS[r], mg = ST[2 * r], mgx = ST[2 * r + 1];
    // g_t = grad_out_t * weight + grad_out * weight_t, the tangent of g = grad_out * weight
    auto gt = [&](int64_t j) {
      A v = GYT ? A(GYT[i * d + j]) * (W ? A(W[j]) : A(1)) : A(0);
      if (WT) v += A(gy[j]) * A(WT[b * d + j]);
      return v;
    };
    A c1 = 0, c2 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t j = lane; j < d; j += kWarp) {
      const A t = gt(j);
      c1 += t;
      c2 += t * A(h[j]);
      if (X) {
        const A x = X[i * d + j];
        a1 += x;
        a2 += A(h[j]) * x;
        a3 += A(g[j]) * x;
      }
    }
    c1 = warp_sum(c1) / A(d);
    c2 = warp_sum(c2) / A(d);
    a1 = warp_sum(a1) / A(d);
    a2 = warp_sum(a2) / A(d);
    a3 = warp_sum(a3) / A(d);
    const A rt = -rs * rs * a2;                        // tangent of rstd (0 without x_t)
    const A k = c2 + rs * (a3 - mg * a1 - mgx * a2);  // tangent of mean(g * xhat)
    for (int64_t j = lane; j < d; j += kWarp) {
      const A xht = X ? rs * (A(X[i * d + j]) - a1 - A(h[j]) * a2) : A(0);  // tangent of xhat
      O[i * d + j] = T(rt * (A(g[j]) - mg - A(h[j]) * mgx) + rs * (gt(j) - c1 - xht * mgx - A(h[j]) * k));
    }
    if (lane == 0) {
      XS[2 * i] = a1;
      XS[2 * i + 1] = a2;
    }
  }
}

// grad_weight_t[b, j] = Σ_r grad_out_t * xhat + grad_out * xhat_t, grad_bias_t[b, j] = Σ_r grad_out_t.
template <typename T, typename A>
__global__ void column_sums_kernel(const T* __restrict__ GY, const T* __restrict__ GYT, const T* __restrict__ X,
                                   const T* __restrict__ H, const T* __restrict__ RS, const A* __restrict__ XS,
                                   T* __restrict__ GW, T* __restrict__ GB, int64_t B, int64_t R, int64_t d) {
  const int64_t n = B * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / d, j = e % d;
    A w = 0, s = 0;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = b * R + r;
      const A h = H[r * d + j];
      if (GYT) {
        const A t = GYT[i * d + j];
        w += t * h;
        s += t;
      }
      if (X) w += A(GY[r * d + j]) * A(RS[r]) * (A(X[i * d + j]) - XS[2 * i] - h * XS[2 * i + 1]);
    }
    GW[e] = T(w);
    GB[e] = T(s);
  }
}

at::Tensor tangent_cuda(const std::optional<at::Tensor>& x_t, const at::Tensor& xhat_, const at::Tensor& rstd_,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& weight_t,
                        const std::optional<at::Tensor>& bias_t) {
  const c10::cuda::CUDAGuard guard(xhat_.device());
  const layer_norm::TangentCall c = layer_norm::tangent_call(x_t, xhat_, rstd_, weight, weight_t, bias_t);
  if (c.out.numel() == 0) return c.out;
  AT_DISPATCH_FLOATING_TYPES(c.xhat.scalar_type(), "layer_norm_tangent_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    tangent_kernel<scalar_t, acc_t><<<row_blocks(c.B * c.R), kWarp * kWarpsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        ptr_or_null<scalar_t>(c.x_t), c.xhat.const_data_ptr<scalar_t>(), c.rstd.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(c.weight), ptr_or_null<scalar_t>(c.weight_t), ptr_or_null<scalar_t>(c.bias_t),
        c.out.mutable_data_ptr<scalar_t>(), c.B, c.R, c.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_tangent_cuda(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_out_t, const std::optional<at::Tensor>& x_t,
    const at::Tensor& xhat_, const at::Tensor& rstd_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& weight_t) {
  const c10::cuda::CUDAGuard guard(xhat_.device());
  const layer_norm::BackwardTangentCall c =
      layer_norm::backward_tangent_call(grad_out_, grad_out_t, x_t, xhat_, rstd_, weight, weight_t);
  if (c.empty()) return {c.grad_x_t, c.grad_weight_t, c.grad_bias_t};
  const at::Tensor &gy = c.grad_out, &gyt = c.grad_out_t, &xt = c.x_t, &xhat = c.xhat, &rstd = c.rstd, &w = c.weight,
                   &wt = c.weight_t, &g = c.g, &stats = c.stats, &gx_t = c.grad_x_t, &gw_t = c.grad_weight_t,
                   &gb_t = c.grad_bias_t;
  const int64_t B = c.B, R = c.R, d = c.d;
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "layer_norm_backward_tangent_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor xs = at::empty({B, R, 2}, xhat.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const auto stream = at::cuda::getCurrentCUDAStream();
    backward_tangent_kernel<scalar_t, acc_t><<<row_blocks(B * R), kWarp * kWarpsPerBlock, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gyt), ptr_or_null<scalar_t>(xt),
        xhat.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
        ptr_or_null<scalar_t>(wt), g.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(),
        gx_t.mutable_data_ptr<scalar_t>(), xs.mutable_data_ptr<acc_t>(), B, R, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((B * d + threads - 1) / threads, 1 << 30));
    column_sums_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gyt), ptr_or_null<scalar_t>(xt),
        xhat.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(), xs.const_data_ptr<acc_t>(),
        gw_t.mutable_data_ptr<scalar_t>(), gb_t.mutable_data_ptr<scalar_t>(), B, R, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx_t, gw_t, gb_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) {
  m.impl("layer_norm_tangent", &tangent_cuda);
  m.impl("layer_norm_backward_tangent", &backward_tangent_cuda);
}

}  // namespace twicediff
