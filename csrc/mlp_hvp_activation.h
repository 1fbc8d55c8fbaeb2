// mlp_hvp: the elementwise activations between its Linear layers and their first two derivatives,
// as host / device functions that the CPU and CUDA kernels both evaluate.
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>

#include "mlp_hvp_codes.h"

namespace twicediff {
namespace mlp_hvp {

constexpr int kMaxChain = 8;  // elementwise activations allowed between two Linear layers

// The elementwise activations that follow one Linear layer, applied in order (a composition).
struct ActivationChain {
  int count = 0;
  int code[kMaxChain];
  double p0[kMaxChain];
  double p1[kMaxChain];
};

// sigma(a), sigma'(a), sigma''(a) of one activation.
template <typename T>
C10_HOST_DEVICE inline void activation_derivatives(int code, T p0, T p1, T a, T& y, T& d1, T& d2) {
  using std::erf;
  using std::exp;
  using std::log1p;
  using std::tanh;
  const T one = T(1), half = T(0.5);
  switch (code) {
    case kReLU:
      y = a > T(0) ? a : T(0); d1 = a > T(0) ? one : T(0); d2 = T(0); break;
    case kLeakyReLU:
      y = a > T(0) ? a : p0 * a; d1 = a > T(0) ? one : p0; d2 = T(0); break;
    case kTanh: {
      const T t = tanh(a);
      y = t; d1 = one - t * t; d2 = T(-2) * t * d1; break;
    }
    case kSigmoid: {
      const T s = one / (one + exp(-a));
      y = s; d1 = s * (one - s); d2 = d1 * (one - T(2) * s); break;
    }
    case kGELU: {
      const T cdf = half * (one + erf(a * T(M_SQRT1_2)));
      const T pdf = T(0.5 * M_2_SQRTPI * M_SQRT1_2) * exp(-half * a * a);
      y = a * cdf; d1 = cdf + a * pdf; d2 = pdf * (T(2) - a * a); break;
    }
    case kGELUTanh: {
      const T k = T(M_SQRT2 * M_2_SQRTPI * 0.5), c = T(0.044715);
      const T u = k * (a + c * a * a * a);
      const T du = k * (one + T(3) * c * a * a);
      const T ddu = k * T(6) * c * a;
      const T t = tanh(u), sech2 = one - t * t;
      y = half * a * (one + t);
      d1 = half * (one + t) + half * a * sech2 * du;
      d2 = sech2 * (du + half * a * (ddu - T(2) * t * du * du));
      break;
    }
    case kSiLU: {
      const T s = one / (one + exp(-a));
      const T ds = s * (one - s), dds = ds * (one - T(2) * s);
      y = a * s; d1 = s + a * ds; d2 = T(2) * ds + a * dds; break;
    }
    case kSoftplus: {
      const T ba = p0 * a;
      if (ba > p1) { y = a; d1 = one; d2 = T(0); }
      else {
        const T s = one / (one + exp(-ba));
        y = log1p(exp(ba)) / p0; d1 = s; d2 = p0 * s * (one - s);
      }
      break;
    }
    default:
      y = a; d1 = one; d2 = T(0);
  }
}

// f = sigma_k o ... o sigma_1: value, f' and f'' by the chain rule
// (f o g)' = f'(g) g',  (f o g)'' = f''(g) g'^2 + f'(g) g''.
template <typename T>
C10_HOST_DEVICE inline void chain_derivatives(const ActivationChain& c, T a, T& y, T& d1, T& d2) {
  y = a; d1 = T(1); d2 = T(0);
  for (int i = 0; i < c.count; ++i) {
    T yi, e1, e2;
    activation_derivatives<T>(c.code[i], T(c.p0[i]), T(c.p1[i]), y, yi, e1, e2);
    d2 = e2 * d1 * d1 + e1 * d2;
    d1 = e1 * d1;
    y = yi;
  }
}

// Whether sigma'' can be non-zero (the f'' terms of the Hessian are needed).
inline bool is_curved(int code) {
  return code != kReLU && code != kLeakyReLU;
}

}  // namespace mlp_hvp
}  // namespace twicediff
