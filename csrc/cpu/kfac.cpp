// CPU kernels of the K-FAC ops (see kfac_common.h for what they compute): the chunking and GEMMs are
// shared with CUDA; the CPU part is the fused accumulation of per-sample squares.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "kfac_common.h"

namespace twicediff {
namespace {

// out[e] += Σ_k m[k, e]² over the n samples of a contiguous m [n, O, I'], entries in parallel; out
// may be any strided [O, I'] view. Each entry's sum is one pass down a column of m's samples.
void square_sum_cpu(const at::Tensor& out, const at::Tensor& m) {
  const int64_t n = m.size(0), O = m.size(1), Ip = m.size(2), E = O * Ip;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "kfac_square_sum_cpu", [&] {
    const scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = out.stride(0), s1 = out.stride(1);
    at::parallel_for(0, O, std::max<int64_t>(1, 16384 / std::max<int64_t>(Ip * n, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        scalar_t* row = op + o * s0;
        for (int64_t k = 0; k < n; ++k) {
          const scalar_t* src = mp + k * E + o * Ip;
          if (s1 == 1) {  // a contiguous row: a loop the compiler vectorises
            for (int64_t i = 0; i < Ip; ++i) row[i] += src[i] * src[i];
          } else {
            for (int64_t i = 0; i < Ip; ++i) row[i * s1] += src[i] * src[i];
          }
        }
      }
    });
  });
}

// Per-sample products formed per batched GEMM before their squares are summed: 1 MiB of float32,
// so that they are still in the core's cache when square_sum_cpu reads them.
constexpr int64_t kSquareTileElements = int64_t{1} << 18;

void covariance_cpu(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weights, bool bias) {
  kfac::covariance(out, x, weights, bias);
}

void eigen_correction_cpu(const at::Tensor& out, const at::Tensor& g, const at::Tensor& a, const at::Tensor& q_s,
                          const at::Tensor& q_a, const std::optional<at::Tensor>& weights, bool bias, int64_t chunk) {
  kfac::eigen_correction(out, g, a, q_s, q_a, weights, bias, chunk, square_sum_cpu, kSquareTileElements);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("kfac_covariance_", &covariance_cpu);
  m.impl("kfac_eigen_correction_", &eigen_correction_cpu);
}

}  // namespace twicediff
