// CPU kernels of the fused solver steps on [D, P] blocks (one row per right-hand side): each is
// one pass over memory, rows in parallel, per-row reductions accumulated in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "solver_step_common.h"
#include "util/parallel.h"

namespace twicediff {
namespace {

// Elements one task touches at least.
constexpr int64_t kGrain = 32768;

at::Tensor cg_step_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                       const at::Tensor& alpha) {
  check_solver_blocks("cg_step", {{"x", &x}, {"r", &r}, {"p", &p}, {"Ap", &Ap}}, 2);
  check_row_coefficients("cg_step", "alpha", alpha, x);
  const int64_t D = x.size(0), P = x.size(1);
  at::Tensor rr = at::zeros({D}, x.options().dtype(at::kDouble));
  if (D == 0 || P == 0) return rr;
  const at::Tensor a = alpha.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cpu", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* app = Ap.data_ptr<scalar_t>();
    const double* ap = a.data_ptr<double>();
    double* out = rr.data_ptr<double>();
    const int64_t x0 = x.stride(0), x1 = x.stride(1), r0 = r.stride(0), r1 = r.stride(1);
    const int64_t p0 = p.stride(0), p1 = p.stride(1), q0 = Ap.stride(0), q1 = Ap.stride(1);
    at::parallel_for(0, D, row_grain(P, kGrain), [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        const scalar_t alpha_d = static_cast<scalar_t>(ap[d]);
        double acc = 0.0;
        for (int64_t j = 0; j < P; ++j) {
          xp[d * x0 + j * x1] += alpha_d * pp[d * p0 + j * p1];
          const scalar_t rj = rp[d * r0 + j * r1] - alpha_d * app[d * q0 + j * q1];
          rp[d * r0 + j * r1] = rj;
          acc += static_cast<double>(rj) * static_cast<double>(rj);
        }
        out[d] = acc;
      }
    });
  });
  return rr;
}

void cg_direction_cpu(const at::Tensor& p, const at::Tensor& z, const at::Tensor& beta) {
  check_solver_blocks("cg_direction", {{"p", &p}, {"z", &z}}, 1);
  check_row_coefficients("cg_direction", "beta", beta, p);
  const int64_t D = p.size(0), P = p.size(1);
  if (D == 0 || P == 0) return;
  const at::Tensor b = beta.contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_cpu", [&] {
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const double* bp = b.data_ptr<double>();
    const int64_t p0 = p.stride(0), p1 = p.stride(1), z0 = z.stride(0), z1 = z.stride(1);
    at::parallel_for(0, D, row_grain(P, kGrain), [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        const scalar_t beta_d = static_cast<scalar_t>(bp[d]);
        for (int64_t j = 0; j < P; ++j) pp[d * p0 + j * p1] = zp[d * z0 + j * z1] + beta_d * pp[d * p0 + j * p1];
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> lissa_step_cpu(const at::Tensor& h, const at::Tensor& b, const at::Tensor& Hh,
                                                  double dampen, double scale, double hessian_perturbation) {
  check_solver_blocks("lissa_step", {{"h", &h}, {"b", &b}, {"Hh", &Hh}}, 1);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0, "lissa_step: scale must be finite and non-zero, got ", scale);
  const int64_t D = h.size(0), P = h.size(1);
  at::Tensor max_rel = at::zeros({D}, h.options().dtype(at::kDouble));
  at::Tensor sum_rel = at::zeros({D}, h.options().dtype(at::kDouble));
  if (D == 0 || P == 0) return {max_rel, sum_rel};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lissa_step_cpu", [&] {
    scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* ap = Hh.data_ptr<scalar_t>();
    double* mx = max_rel.data_ptr<double>();
    double* sm = sum_rel.data_ptr<double>();
    const int64_t h0 = h.stride(0), h1 = h.stride(1), b0 = b.stride(0), b1 = b.stride(1);
    const int64_t a0 = Hh.stride(0), a1 = Hh.stride(1);
    const scalar_t keep = static_cast<scalar_t>(1.0 - dampen - hessian_perturbation / scale);
    const scalar_t inv_scale = static_cast<scalar_t>(1.0 / scale);
    at::parallel_for(0, D, row_grain(P, kGrain), [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        double row_max = 0.0, row_sum = 0.0;
        bool finite = true;
        for (int64_t j = 0; j < P; ++j) {
          const scalar_t old = hp[d * h0 + j * h1];
          const scalar_t fresh = bp[d * b0 + j * b1] + keep * old - inv_scale * ap[d * a0 + j * a1];
          hp[d * h0 + j * h1] = fresh;
          finite = finite && std::isfinite(fresh);
          const double delta = std::abs(static_cast<double>(fresh) - static_cast<double>(old));
          const double rel = delta == 0.0 ? 0.0 : delta / std::abs(static_cast<double>(fresh));
          row_max = std::max(row_max, rel);
          row_sum += rel;
        }
        const double nan = std::numeric_limits<double>::quiet_NaN();
        mx[d] = finite ? row_max : nan;
        sm[d] = finite ? row_sum : nan;
      }
    });
  });
  return {max_rel, sum_rel};
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("cg_step", &cg_step_cpu);
  m.impl("cg_direction", &cg_direction_cpu);
  m.impl("lissa_step", &lissa_step_cpu);
}

}  // namespace twicediff
