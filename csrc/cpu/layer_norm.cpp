// CPU kernels of the LayerNorm tangent ops (what they compute: python/twicediff/ops/reference.py;
// checks and shapes: layer_norm_common.h). One pass per row of d features: the row's sums first
// (omp simd reductions, so that they vectorise without reassociating the rest of the file;
// _Pragma because they sit inside AT_DISPATCH's macro argument), then
// the row's output. layer_norm_tangent runs rows in parallel; layer_norm_backward_tangent runs tiles
// of (direction, row block) in parallel, each summing its weight and bias tangents into its own
// partial row, and adds the partials up in a fixed order, so results do not depend on the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "layer_norm_common.h"

namespace twicediff {
namespace {

using layer_norm::ptr_or_null;

at::Tensor tangent_cpu(const std::optional<at::Tensor>& x_t, const at::Tensor& xhat_, const at::Tensor& rstd_,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& weight_t,
                       const std::optional<at::Tensor>& bias_t) {
  const layer_norm::TangentCall c = layer_norm::tangent_call(x_t, xhat_, rstd_, weight, weight_t, bias_t);
  const int64_t B = c.B, R = c.R, d = c.d;
  if (c.out.numel() == 0) return c.out;
  AT_DISPATCH_FLOATING_TYPES(c.xhat.scalar_type(), "layer_norm_tangent_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *X = ptr_or_null<scalar_t>(c.x_t), *H = c.xhat.const_data_ptr<scalar_t>(),
                   *RS = c.rstd.const_data_ptr<scalar_t>(), *W = ptr_or_null<scalar_t>(c.weight),
                   *WT = ptr_or_null<scalar_t>(c.weight_t), *BT = ptr_or_null<scalar_t>(c.bias_t);
    scalar_t* O = c.out.mutable_data_ptr<scalar_t>();
    const acc_t inv = acc_t(1) / acc_t(d);
    at::parallel_for(0, B * R, std::max<int64_t>(1, 8192 / d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / R, r = i % R;
        const scalar_t* h = H + r * d;
        scalar_t* o = O + i * d;
        if (X) {
          const scalar_t* x = X + i * d;
          acc_t s1 = 0, s2 = 0;
          _Pragma("omp simd reduction(+ : s1, s2)")
          for (int64_t j = 0; j < d; ++j) {
            s1 += x[j];
            s2 += acc_t(h[j]) * x[j];
          }
          const acc_t m1 = s1 * inv, m2 = s2 * inv, rs = RS[r];
          if (W) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) o[j] = W[j] * rs * (x[j] - m1 - h[j] * m2);
          } else {
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) o[j] = rs * (x[j] - m1 - h[j] * m2);
          }
        } else {
          for (int64_t j = 0; j < d; ++j) o[j] = 0;
        }
        if (WT) {
          const scalar_t* wtb = WT + b * d;
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) o[j] += wtb[j] * h[j];
        }
        if (BT) {
          const scalar_t* btb = BT + b * d;
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) o[j] += btb[j];
        }
      }
    });
  });
  return c.out;
}

// Rows per tile of layer_norm_backward_tangent: enough work per task, few partial rows to add up.
constexpr int64_t kTileElements = 16384;

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_tangent_cpu(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_out_t, const std::optional<at::Tensor>& x_t,
    const at::Tensor& xhat_, const at::Tensor& rstd_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& weight_t) {
  const layer_norm::BackwardTangentCall c =
      layer_norm::backward_tangent_call(grad_out_, grad_out_t, x_t, xhat_, rstd_, weight, weight_t);
  if (c.empty()) return {c.grad_x_t, c.grad_weight_t, c.grad_bias_t};
  const at::Tensor &gy = c.grad_out, &gyt = c.grad_out_t, &xt = c.x_t, &xhat = c.xhat, &rstd = c.rstd, &w = c.weight,
                   &wt = c.weight_t, &g = c.g, &stats = c.stats, &gx_t = c.grad_x_t;
  const int64_t B = c.B, R = c.R, d = c.d;
  const int64_t rows_per_tile = std::max<int64_t>(1, kTileElements / d);
  const int64_t C = (R + rows_per_tile - 1) / rows_per_tile;  // row blocks
  at::Tensor partial = at::zeros({B, C, 2, d}, xhat.options());  // per tile: weight and bias tangent sums
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "layer_norm_backward_tangent_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *GY = gy.const_data_ptr<scalar_t>(), *GYT = ptr_or_null<scalar_t>(gyt),
                   *X = ptr_or_null<scalar_t>(xt), *H = xhat.const_data_ptr<scalar_t>(),
                   *RS = rstd.const_data_ptr<scalar_t>(), *W = ptr_or_null<scalar_t>(w),
                   *WT = ptr_or_null<scalar_t>(wt), *G = g.const_data_ptr<scalar_t>(),
                   *ST = stats.const_data_ptr<scalar_t>();
    scalar_t *O = gx_t.mutable_data_ptr<scalar_t>(), *P = partial.mutable_data_ptr<scalar_t>();
    const acc_t inv = acc_t(1) / acc_t(d);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gt_row(d);
      scalar_t* gt = gt_row.data();
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b = tile / C, c = tile % C;
        scalar_t* pw = P + tile * 2 * d;  // Σ grad_out_t * xhat + grad_out * xhat_t over the tile's rows
        scalar_t* pb = pw + d;            // Σ grad_out_t
        const scalar_t* wtb = WT ? WT + b * d : nullptr;
        for (int64_t r = c * rows_per_tile; r < std::min(R, (c + 1) * rows_per_tile); ++r) {
          const int64_t i = b * R + r;
          const scalar_t *h = H + r * d, *gr = G + r * d, *gyr = GY + r * d;
          const scalar_t* gytr = GYT ? GYT + i * d : nullptr;
          const acc_t rs = RS[r], mg = ST[2 * r], mgx = ST[2 * r + 1];
          // g_t = grad_out_t * weight + grad_out * weight_t, the tangent of g = grad_out * weight
          if (gytr && W) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) gt[j] = gytr[j] * W[j];
          } else if (gytr) {
            for (int64_t j = 0; j < d; ++j) gt[j] = gytr[j];
          } else {
            for (int64_t j = 0; j < d; ++j) gt[j] = 0;
          }
          if (wtb) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) gt[j] += gyr[j] * wtb[j];
          }
          acc_t c1 = 0, c2 = 0;
          _Pragma("omp simd reduction(+ : c1, c2)")
          for (int64_t j = 0; j < d; ++j) {
            c1 += gt[j];
            c2 += acc_t(gt[j]) * h[j];
          }
          c1 *= inv;
          c2 *= inv;
          if (gytr) {
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) {
              pw[j] += gytr[j] * h[j];
              pb[j] += gytr[j];
            }
          }
          scalar_t* o = O + i * d;
          if (X) {
            const scalar_t* x = X + i * d;
            acc_t a1 = 0, a2 = 0, a3 = 0;
            _Pragma("omp simd reduction(+ : a1, a2, a3)")
            for (int64_t j = 0; j < d; ++j) {
              a1 += x[j];
              a2 += acc_t(h[j]) * x[j];
              a3 += acc_t(gr[j]) * x[j];
            }
            a1 *= inv;
            a2 *= inv;
            a3 *= inv;
            const acc_t rt = -rs * rs * a2;                        // tangent of rstd
            const acc_t k = c2 + rs * (a3 - mg * a1 - mgx * a2);  // tangent of mean(g * xhat)
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) {
              const acc_t xht = rs * (x[j] - a1 - h[j] * a2);  // tangent of xhat
              o[j] = rt * (gr[j] - mg - h[j] * mgx) + rs * (gt[j] - c1 - xht * mgx - h[j] * k);
              pw[j] += gyr[j] * xht;
            }
          } else {
            _Pragma("omp simd")
            for (int64_t j = 0; j < d; ++j) o[j] = rs * (gt[j] - c1 - h[j] * c2);
          }
        }
      }
    });
  });
  const at::Tensor sums = partial.sum(1);  // [B, 2, d], the row blocks added in order
  c.grad_weight_t.copy_(sums.select(1, 0));
  c.grad_bias_t.copy_(sums.select(1, 1));
  return {c.grad_x_t, c.grad_weight_t, c.grad_bias_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("layer_norm_tangent", &tangent_cpu);
  m.impl("layer_norm_backward_tangent", &backward_tangent_cpu);
}

}  // namespace twicediff
