// The K-FAC ops shared by the CPU and CUDA kernels (cpu/kfac.cpp, cuda/kfac.cu): argument checks,
// and the drivers that split the work into bounded chunks, run the GEMMs through ATen (the vendor
// BLAS on the current stream) and hand the per-sample squares to the device's fused kernel.
//
//   kfac_covariance_:        out [D, D] += Σ_r w_r ā_r ā_rᵀ,  ā_r = [x_r, 1] (bias) or x_r, x [R, d]
//   kfac_eigen_correction_:  out [O, I'] += Σ_n (Q_Sᵀ G_n Q_A)²,  G_n = Σ_t w_nt g_nt ā_ntᵀ,
//                            g [N, T, O], a [N, T, I], q_s [O, O], q_a [I', I'], I' = I + bias
//
// The bias column of ā is never materialised: its part of a covariance is the weighted column sum
// of x (and the sum of the weights), its part of a rotation Q_Aᵀ ā is the last row of Q_A added to
// x's rotation by the first I rows. Inputs of any floating dtype (float16, bfloat16, float32,
// float64) are converted chunk by chunk to out's dtype (float32 or float64), where the sums are
// accumulated. No [N, O, I'] tensor is formed beyond one chunk of samples.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <optional>

#include "util/overlap.h"

namespace twicediff {
namespace kfac {

// Elements one chunk of per-sample work may hold (per temporary), when the caller leaves it to us.
constexpr int64_t kChunkElements = int64_t{1} << 22;

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_out(const char* op, const at::Tensor& out, int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
                   ": out (the accumulator) must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows && out.size(1) == cols, op, ": out must have shape [", rows,
                    ", ", cols, "], got ", out.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out is written in place and must not have overlapping memory (an expanded view), got strides ",
                    out.strides());
}

inline void check_same_device(const char* op, const at::Tensor& out, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == out.device(), op, ": ", name, " must be on the device of out (", out.device(),
                    "), got ", t.device());
  TORCH_CHECK_VALUE(!may_share_memory(out, t), op, ": out is written in place and must not share memory with ", name);
}

inline at::Tensor weights_as(const char* op, const std::optional<at::Tensor>& weights, at::IntArrayRef shape,
                             const at::Tensor& out) {
  const at::Tensor& w = *weights;
  TORCH_CHECK_TYPE(w.is_floating_point() || w.scalar_type() == at::kBool, op,
                   ": weights must be a floating or bool tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.sizes() == shape, op, ": weights must have shape ", shape, ", got ", w.sizes());
  check_same_device(op, out, "weights", w);
  return w.to(out.scalar_type());
}

// out [D, D] += Σ_r w_r ā_r ā_rᵀ.
inline void covariance(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weights,
                       bool bias) {
  const char* op = "kfac_covariance_";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be a 2-d [rows, d] tensor, got shape ", x.sizes());
  check_floating(op, "x", x);
  const int64_t R = x.size(0), d = x.size(1), D = d + (bias ? 1 : 0);
  check_out(op, out, D, D);
  check_same_device(op, out, "x", x);
  at::Tensor w;
  if (weights.has_value()) w = weights_as(op, weights, {R}, out);
  if (R == 0 || D == 0) return;
  const auto dt = out.scalar_type();
  const int64_t rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(d, 1));
  at::Tensor xx = out.narrow(0, 0, d).narrow(1, 0, d);
  for (int64_t r0 = 0; r0 < R; r0 += rows) {
    const int64_t n = std::min(rows, R - r0);
    const at::Tensor xc = x.narrow(0, r0, n).to(dt);
    const at::Tensor wc = w.defined() ? w.narrow(0, r0, n) : at::Tensor();
    const at::Tensor xw = wc.defined() ? xc * wc.unsqueeze(1) : xc;
    if (d > 0) xx.addmm_(xw.t(), xc);
    if (bias) {
      if (d > 0) {
        const at::Tensor colsum = xw.sum(0);
        out.narrow(0, d, 1).narrow(1, 0, d).add_(colsum.unsqueeze(0));
        out.narrow(0, 0, d).narrow(1, d, 1).add_(colsum.unsqueeze(1));
      }
      out.narrow(0, d, 1).narrow(1, d, 1).add_(wc.defined() ? wc.sum().reshape({1, 1})
                                                              : at::full({1, 1}, static_cast<double>(n), out.options()));
    }
  }
}

// out [O, I'] += Σ_n (Q_Sᵀ G_n Q_A)². `square_sum(out, m)` adds Σ_k m[k]² over the leading
// dimension of a contiguous m [n, O, I'] into out: the device's fused kernel.
//
// `tile_elements` bounds the per-sample products formed by one batched GEMM (0: a whole chunk of
// samples at once). The rotations are GEMMs over all the chunk's tokens either way; only the
// products Q_Sᵀ G_n Q_A, which are squared and summed right after, are formed a few samples at a
// time. On the CPU that keeps them in cache between the GEMM that writes them and the loop that
// squares them (a whole chunk's products are many MB, written to memory and read back); on the GPU
// one launch over the whole chunk is better, and the CUDA kernels pass 0.
template <class SquareSum>
void eigen_correction(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a, const at::Tensor& q_s,
                      const at::Tensor& q_a, const std::optional<at::Tensor>& weights, bool bias, int64_t chunk,
                      SquareSum&& square_sum, int64_t tile_elements = 0) {
  const char* op = "kfac_eigen_correction_";
  TORCH_CHECK_VALUE(g.dim() == 3, op, ": g must be a 3-d [N, T, O] tensor (samples, tokens, outputs), got shape ",
                    g.sizes());
  TORCH_CHECK_VALUE(a.dim() == 3, op, ": a must be a 3-d [N, T, I] tensor (samples, tokens, inputs), got shape ",
                    a.sizes());
  TORCH_CHECK_VALUE(a.size(0) == g.size(0) && a.size(1) == g.size(1), op,
                    ": a and g must have the same samples and tokens [N, T], got a ", a.sizes(), " and g ", g.sizes());
  check_floating(op, "g", g);
  check_floating(op, "a", a);
  check_floating(op, "q_s", q_s);
  check_floating(op, "q_a", q_a);
  TORCH_CHECK_VALUE(chunk >= 0, op, ": chunk must be >= 0 (0: automatic), got ", chunk);
  const int64_t N = g.size(0), T = g.size(1), O = g.size(2), I = a.size(2), Ip = I + (bias ? 1 : 0);
  check_out(op, out, O, Ip);
  TORCH_CHECK_VALUE(q_s.dim() == 2 && q_s.size(0) == O && q_s.size(1) == O, op, ": q_s must have shape [", O, ", ", O,
                    "], got ", q_s.sizes());
  TORCH_CHECK_VALUE(q_a.dim() == 2 && q_a.size(0) == Ip && q_a.size(1) == Ip, op, ": q_a must have shape [", Ip, ", ",
                    Ip, "], got ", q_a.sizes());
  check_same_device(op, out, "g", g);
  check_same_device(op, out, "a", a);
  check_same_device(op, out, "q_s", q_s);
  check_same_device(op, out, "q_a", q_a);
  at::Tensor w;
  if (weights.has_value()) w = weights_as(op, weights, {N, T}, out);
  if (N == 0 || T == 0 || O == 0 || Ip == 0) return;
  const auto dt = out.scalar_type();
  const at::Tensor qs = q_s.to(dt);
  const at::Tensor qa = q_a.to(dt);
  const at::Tensor qa_top = qa.narrow(0, 0, I);
  const int64_t per_sample = std::max<int64_t>(1, std::max(O * Ip, T * (O + Ip)));
  const int64_t step = chunk > 0 ? chunk : std::max<int64_t>(1, kChunkElements / per_sample);
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t n = std::min(step, N - n0);
    at::Tensor gc = g.narrow(0, n0, n).to(dt);
    if (w.defined()) gc = gc * w.narrow(0, n0, n).unsqueeze(2);
    const at::Tensor gr = at::matmul(gc, qs);  // rows g_tᵀ Q_S = (Q_Sᵀ g_t)ᵀ, [n, T, O]
    at::Tensor ar = I > 0 ? at::matmul(a.narrow(0, n0, n).to(dt), qa_top)
                          : at::zeros({n, T, Ip}, out.options());  // (Q_Aᵀ ā_t)ᵀ, [n, T, I']
    if (bias) ar.add_(qa.narrow(0, I, 1));
    if (T == 1) {
      // One token: Q_Sᵀ G_n Q_A is the outer product of the two rotations, and its square the outer
      // product of their squares, so the sum over samples is one GEMM of squares.
      const at::Tensor g2 = gr.squeeze(1).square();
      const at::Tensor a2 = ar.squeeze(1).square();
      out.addmm_(g2.t(), a2);
    } else {
      const int64_t tile = tile_elements > 0 ? std::max<int64_t>(1, tile_elements / std::max<int64_t>(O * Ip, 1)) : n;
      const at::Tensor grt = gr.transpose(1, 2);  // [n, O, T]
      for (int64_t k0 = 0; k0 < n; k0 += tile) {
        const int64_t k = std::min(tile, n - k0);
        const at::Tensor m = at::bmm(grt.narrow(0, k0, k), ar.narrow(0, k0, k)).contiguous();  // [k, O, I']
        square_sum(out, m);
      }
    }
  }
}

}  // namespace kfac
}  // namespace twicediff
