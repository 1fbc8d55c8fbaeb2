// CPU kernels of mlp_hvp: the elementwise passes of the R-operator (see mlp_hvp_driver.h for the
// driver and the layout), as parallel loops over contiguous rows; the fused pass over a narrow
// output layer is in cpu/mlp_hvp_fused_head.cpp; GEMMs go through cpu/gemm.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/mlp_hvp_fused_head.h"
#include "cpu/mlp_hvp_loss.h"
#include "mlp_hvp_driver.h"
#include "util/no_guard.h"
#include "util/parallel.h"

namespace twicediff {
namespace mlp_hvp {
namespace {

using cpu::curvature_row;

constexpr int64_t kGrain = 16384;  // elements per task below which threads are not woken

// Runs body(n_begin, n_end, acc) over slices of the N rows of an [N, cols] matrix, one slice per
// thread, each with its own zeroed accumulator row acc [cols]; then, when `sums` is given,
// sums[d, o] = sum over slices of acc[d*W + o] (sums [D, W] with any strides). Rows are walked in
// memory order, so a pass over the matrix can also reduce it over N without a second pass.
template <typename scalar_t, typename F>
void for_row_slices(int64_t N, int64_t cols, int64_t W, scalar_t* sums, int64_t ss0, int64_t ss1, const F& body) {
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                 N * cols / std::max<int64_t>(kGrain, 1)));
  std::vector<scalar_t> acc(sums ? slices * cols : 0, scalar_t(0));
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      body(t * N / slices, (t + 1) * N / slices, sums ? acc.data() + t * cols : nullptr);
  });
  if (!sums) return;
  for (int64_t j = 0; j < cols; ++j) {
    scalar_t total = 0;
    for (int64_t t = 0; t < slices; ++t) total += acc[t * cols + j];
    sums[(j / W) * ss0 + (j % W) * ss1] = total;
  }
}

struct CpuKernels {
  static NoGuard device_guard(at::Device) { return {}; }
  // Large blocks from the CPU allocator are faulted in afresh on every call; keep them (util/scratch.h).
  static constexpr bool kCacheScratch = true;
  // MKL's dgemm runs R(g_a)^T h, with R(g_a) [N, D*out] transposed, at about half the speed of
  // h^T R(g_a); sgemm runs both alike and the transposing write then costs more than it saves.
  // NOTE: measured in benchmarks/results/native_hvp_orientation.md.
  static bool weight_grad_input_major(at::ScalarType dtype) { return dtype == at::kDouble; }
  // One part per thread, each part's GEMMs single-threaded: faster than one R-pass with the BLAS
  // threaded, whose small GEMMs scale poorly across threads. The parts' sizes differ by one
  // direction at most; fewer parts are taken while the largest would exceed the mean by over 25%
  // (D = 3 on 2 threads stays whole: a part of 2 and one of 1 ran slower than one R-pass).
  // NOTE: measured in benchmarks/results/native_hvp_model_a.md.
  static int64_t direction_parts(int64_t D) {
    int64_t parts = std::min<int64_t>(at::get_num_threads(), D);
    while (parts > 1 && 4 * ((D + parts - 1) / parts) * parts > 5 * D) --parts;
    return std::max<int64_t>(parts, 1);
  }
  // A part's directions in R-passes of a few at a time, so that each pass's [N, d*width]
  // R-quantities stay near the core's L2 cache: one [N, d*width] block of at most twice the L2
  // (sysconf's size, 1 MiB where it says none). In one pass a part's blocks ran from memory; the
  // best pass size, swept over N and widths, tracked that block size, and wide GEMMs did not mind.
  // NOTE: measured in benchmarks/results/native_hvp_model_a.md (the directions-per-pass section).
  static int64_t directions_per_pass(int64_t D, int64_t row_bytes) {
    static const int64_t budget = 2 * l2_bytes();
    return std::clamp<int64_t>(budget / std::max<int64_t>(row_bytes, 1), 1, std::max<int64_t>(D, 1));
  }
  static int64_t l2_bytes() {
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return size > 0 ? static_cast<int64_t>(size) : int64_t(1) << 20;
  }
  // The calling thread's GEMM library (cpu/gemm.h: the probe's choice for this call), taken by the
  // threads that run the parts.
  static bool caller_settings() { return twicediff::cpu::blas_in_thread(); }
  static twicediff::cpu::BlasInThread in_worker(bool blas) { return twicediff::cpu::BlasInThread(blas); }

  // The output layer's narrow GEMMs, loss curvature and bias sums in one pass, in float64
  // (cpu/mlp_hvp_fused_head.cpp).
  static constexpr bool kFusedHead = true;
  static bool fuses_head(const Plan& plan, at::ScalarType dtype) { return cpu::fuses_head(plan, dtype); }
  static void fused_head(const Plan& plan, const at::Tensor& w, const at::Tensor& vdirs, at::Tensor& ra,
                         const at::Tensor& s1, const at::Tensor& s2gh, const at::Tensor& ga, const at::Tensor& prob,
                         at::Tensor& rz, const at::Tensor& second, const at::Tensor& bias_out,
                         const at::Tensor& hidden_bias_out) {
    cpu::fused_head(plan, w, vdirs, ra, s1, s2gh, ga, prob, rz, second, bias_out, hidden_bias_out);
  }

  static void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
    twicediff::cpu::gemm(out, a, b, beta);
  }

  static void forward_activation(const at::Tensor& a, const ActivationChain& chain, at::Tensor& h, at::Tensor& s1,
                                 at::Tensor& s2) {
    // A lone Tanh or tanh-approximated GELU takes its tanh from ATen's vectorised kernel and the
    // rest from it by arithmetic: libm's scalar tanh made up a large share of a one-direction call.
    // The formulas are those of activation_derivatives. NOTE: measured in
    // benchmarks/results/native_hvp_model_a.md.
    if (chain.count == 1 && (chain.code[0] == kTanh || chain.code[0] == kGELUTanh)) {
      const bool gelu = chain.code[0] == kGELUTanh;
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_tanh", [&] {
        const scalar_t* __restrict__ pa = a.const_data_ptr<scalar_t>();
        scalar_t* __restrict__ ph = h.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p1 = s1.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p2 = s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr;
        const scalar_t one = 1, half = 0.5, k = M_SQRT2 * M_2_SQRTPI * 0.5, c = 0.044715;
        if (!gelu) {
          at::tanh_out(h, a);
        } else {  // h holds tanh(u), u = k (a + c a^3), until the loop below writes the value
          at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) ph[i] = k * (pa[i] + c * pa[i] * pa[i] * pa[i]);
          });
          at::tanh_(h);
        }
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t t = ph[i], sech2 = one - t * t;
            if (!gelu) {
              p1[i] = sech2;
              if (p2) p2[i] = scalar_t(-2) * t * sech2;
              continue;
            }
            const scalar_t x = pa[i], du = k * (one + scalar_t(3) * c * x * x), ddu = k * scalar_t(6) * c * x;
            ph[i] = half * x * (one + t);
            p1[i] = half * (one + t) + half * x * sech2 * du;
            if (p2) p2[i] = sech2 * (du + half * x * (ddu - scalar_t(2) * t * du * du));
          }
        });
      });
      return;
    }
    // A lone Softplus likewise: log1p(exp(z)) = max(z, 0) + log1p(e) with z = beta a and
    // e = exp(-|z|) in (0, 1], exp and log from ATen's vectorised kernels instead of libm's scalar
    // ones (ATen's log1p is not vectorised). log1p(e) = log(u) e / (u - 1) with u = 1 + e rounded
    // keeps full accuracy for tiny e (Goldberg's formula).
    if (chain.count == 1 && chain.code[0] == kSoftplus) {
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_softplus", [&] {
        const scalar_t* __restrict__ pa = a.const_data_ptr<scalar_t>();
        scalar_t* __restrict__ ph = h.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p1 = s1.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p2 = s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr;
        const scalar_t beta = chain.p0[0], threshold = chain.p1[0], one = 1;
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) p1[i] = -std::abs(beta * pa[i]);
        });
        at::exp_(s1);  // s1 = e = exp(-|z|)
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) ph[i] = one + p1[i];
        });
        at::log_(h);   // h = log(u), u = 1 + e
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t z = beta * pa[i], e = p1[i], u = one + e;
            const scalar_t log1p_e = u == one ? e : ph[i] * (e / (u - one));
            if (z > threshold) {
              ph[i] = pa[i];
              p1[i] = one;
              if (p2) p2[i] = 0;
              continue;
            }
            const scalar_t sig = z >= 0 ? one / (one + e) : e / (one + e);
            ph[i] = (std::max(z, scalar_t(0)) + log1p_e) / beta;
            p1[i] = sig;
            if (p2) p2[i] = beta * sig * (one - sig);
          }
        });
      });
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_activation", [&] {
      const scalar_t* pa = a.const_data_ptr<scalar_t>();
      scalar_t* ph = h.mutable_data_ptr<scalar_t>();
      scalar_t* p1 = s1.mutable_data_ptr<scalar_t>();
      scalar_t* p2 = s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t y, d1, d2;
          chain_derivatives<scalar_t>(chain, pa[i], y, d1, d2);
          ph[i] = y;
          p1[i] = d1;
          if (p2) p2[i] = d2;
        }
      });
    });
  }

  static void loss_forward(const at::Tensor& z, const at::Tensor& target, const Plan& plan, at::Tensor& prob,
                           at::Tensor& g) {
    const int64_t N = z.size(0), C = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_hvp_loss_forward", [&] {
      const scalar_t* pz = z.const_data_ptr<scalar_t>();
      scalar_t* pp = prob.defined() ? prob.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* pg = g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t scale = static_cast<scalar_t>(plan.scale);
      at::parallel_for(0, N, row_grain(C, kGrain), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* zr = pz + n * C;
          if (plan.loss == kCrossEntropy) {
            scalar_t m = zr[0];
            for (int64_t c = 1; c < C; ++c) m = std::max(m, zr[c]);
            scalar_t sum = 0;
            for (int64_t c = 0; c < C; ++c) sum += (pp[n * C + c] = std::exp(zr[c] - m));
            const scalar_t inv = scalar_t(1) / sum;
            for (int64_t c = 0; c < C; ++c) pp[n * C + c] *= inv;
            if (pg) {
              const int64_t t = target.const_data_ptr<int64_t>()[n];
              for (int64_t c = 0; c < C; ++c) pg[n * C + c] = scale * (pp[n * C + c] - scalar_t(c == t));
            }
          } else {
            const scalar_t* yr = target.const_data_ptr<scalar_t>() + n * C;
            for (int64_t c = 0; c < C; ++c) {
              if (plan.loss == kBCEWithLogits) {
                const scalar_t s = scalar_t(1) / (scalar_t(1) + std::exp(-zr[c]));
                pp[n * C + c] = s;
                if (pg) pg[n * C + c] = scale * (s - yr[c]);
              } else if (pg) {
                pg[n * C + c] = scale * (zr[c] - yr[c]);
              }
            }
          }
        }
      });
    });
  }

  static void loss_curvature(const at::Tensor& rz, const at::Tensor& z, const at::Tensor& prob, const Plan& plan,
                             at::Tensor& rg, int64_t D) {
    const int64_t N = z.size(0), C = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(rz.scalar_type(), "mlp_hvp_loss_curvature", [&] {
      const scalar_t* pr = rz.const_data_ptr<scalar_t>();
      const scalar_t* pp = prob.defined() ? prob.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* po = rg.mutable_data_ptr<scalar_t>();
      const scalar_t scale = static_cast<scalar_t>(plan.scale);
      at::parallel_for(0, N * D, row_grain(C, kGrain), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row)
          curvature_row(plan.loss, pp ? pp + (row / D) * C : nullptr, pr + row * C, po + row * C, C, scale);
      });
    });
  }

  static void backward_activation(const at::Tensor& gh, const at::Tensor& s1, const at::Tensor& s2, at::Tensor& ga,
                                  at::Tensor& s2gh) {
    AT_DISPATCH_FLOATING_TYPES(gh.scalar_type(), "mlp_hvp_backward_activation", [&] {
      const scalar_t* pg = gh.const_data_ptr<scalar_t>();
      const scalar_t* p1 = s1.const_data_ptr<scalar_t>();
      const scalar_t* p2 = s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* pa = ga.mutable_data_ptr<scalar_t>();
      scalar_t* pq = s2gh.defined() ? s2gh.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, gh.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) pa[i] = p1[i] * pg[i];
        if (p2 && pq)
          for (int64_t i = begin; i < end; ++i) pq[i] = p2[i] * pg[i];
      });
    });
  }

  static void rforward_activation(const at::Tensor& ra, const at::Tensor& s1, at::Tensor& rh, int64_t D) {
    const int64_t rows = ra.size(0) * D, W = ra.size(1) / D;
    AT_DISPATCH_FLOATING_TYPES(ra.scalar_type(), "mlp_hvp_rforward_activation", [&] {
      const scalar_t* pa = ra.const_data_ptr<scalar_t>();  // may alias rh (in place)
      scalar_t* ph = rh.mutable_data_ptr<scalar_t>();
      const scalar_t* __restrict__ p1 = s1.const_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(W, kGrain), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* __restrict__ s = p1 + (row / D) * W;
          const scalar_t* a = pa + row * W;
          scalar_t* h = ph + row * W;
          for (int64_t o = 0; o < W; ++o) h[o] = s[o] * a[o];
        }
      });
    });
  }

  // rg = s1 rg + s2gh ra over [N, D*W]; with bias_out, also bias_out[d, o] = sum_n rg[n, d*W + o]
  // in the same pass.
  static void rbackward_activation(at::Tensor& rg, const at::Tensor& s1, const at::Tensor& s2gh, const at::Tensor& ra,
                                   int64_t D, const at::Tensor& bias_out) {
    const int64_t N = rg.size(0), cols = rg.size(1), W = cols / D;
    AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "mlp_hvp_rbackward_activation", [&] {
      scalar_t* pg = rg.mutable_data_ptr<scalar_t>();
      const scalar_t* p1 = s1.const_data_ptr<scalar_t>();
      const scalar_t* pq = s2gh.defined() ? s2gh.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* pa = ra.const_data_ptr<scalar_t>();
      scalar_t* pb = bias_out.defined() ? bias_out.mutable_data_ptr<scalar_t>() : nullptr;
      for_row_slices<scalar_t>(N, cols, W, pb, pb ? bias_out.stride(0) : 0, pb ? bias_out.stride(1) : 0,
                               [&](int64_t n0, int64_t n1, scalar_t* acc) {
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* __restrict__ s = p1 + n * W;
          const scalar_t* __restrict__ q = pq ? pq + n * W : nullptr;
          for (int64_t d = 0; d < D; ++d) {
            scalar_t* __restrict__ g = pg + n * cols + d * W;
            const scalar_t* __restrict__ a = pa + n * cols + d * W;
            if (q) {
              for (int64_t o = 0; o < W; ++o) g[o] = s[o] * g[o] + q[o] * a[o];
            } else {
              for (int64_t o = 0; o < W; ++o) g[o] = s[o] * g[o];
            }
            if (acc) {
              scalar_t* __restrict__ c = acc + d * W;
              for (int64_t o = 0; o < W; ++o) c[o] += g[o];
            }
          }
        }
      });
    });
  }

  static void column_sums(const at::Tensor& m, const at::Tensor& out, int64_t D) {
    const int64_t N = m.size(0), cols = m.size(1), W = cols / D;
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "mlp_hvp_column_sums", [&] {
      const scalar_t* pm = m.const_data_ptr<scalar_t>();
      for_row_slices<scalar_t>(N, cols, W, out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1),
                               [&](int64_t n0, int64_t n1, scalar_t* acc) {
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* __restrict__ r = pm + n * cols;
          for (int64_t j = 0; j < cols; ++j) acc[j] += r[j];
        }
      });
    });
  }
};

}  // namespace
}  // namespace mlp_hvp

TORCH_LIBRARY_IMPL(twicediff, CPU, m) { m.impl("mlp_hvp", &mlp_hvp::mlp_hvp_op<mlp_hvp::CpuKernels>); }

}  // namespace twicediff
