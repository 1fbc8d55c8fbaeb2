// mlp_hvp on the CPU: the loss curvature of one row of logits, shared by the elementwise pass
// (cpu/mlp_hvp.cpp) and the fused output-layer pass (cpu/mlp_hvp_fused_head.cpp).
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

#include "mlp_hvp_codes.h"

namespace twicediff {
namespace mlp_hvp {
namespace cpu {

// o = scale H_loss(n) r for one row of C logits: (diag(p) - p p^T) r (cross-entropy), p (1 - p) r
// (BCE with logits) or r (MSE); p = softmax / sigmoid of the row's logits (unused for MSE). o may
// alias r.
template <typename scalar_t>
C10_ALWAYS_INLINE void curvature_row(Loss loss, const scalar_t* p, const scalar_t* r, scalar_t* o, int64_t C,
                                     scalar_t scale) {
  if (loss == kCrossEntropy) {
    scalar_t pr_dot = 0;
    for (int64_t c = 0; c < C; ++c) pr_dot += p[c] * r[c];
    for (int64_t c = 0; c < C; ++c) o[c] = scale * p[c] * (r[c] - pr_dot);
  } else if (loss == kBCEWithLogits) {
    for (int64_t c = 0; c < C; ++c) o[c] = scale * p[c] * (scalar_t(1) - p[c]) * r[c];
  } else {
    for (int64_t c = 0; c < C; ++c) o[c] = scale * r[c];
  }
}

}  // namespace cpu
}  // namespace mlp_hvp
}  // namespace twicediff
