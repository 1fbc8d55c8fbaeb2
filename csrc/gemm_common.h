// The gemm_ op (out = beta out + alpha a b) and the GEMMs of the native kernels: argument checks shared
// by the CPU (cpu/gemm.cpp) and CUDA (cuda/gemm.cu) kernels, and ATen's GEMM, which CUDA always
// takes and the CPU takes where oneDNN does not (see cpu/gemm.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "util/overlap.h"

namespace twicediff {

// out [M, N], a [M, K], b [K, N]: 2-d, one floating dtype, one device; out does not overlap itself
// (an expanded view) or a or b.
inline void check_gemm_args(const char* op, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": a must be a 2-d [M, K] matrix, got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": b must be a 2-d [K, N] matrix, got shape ", b.sizes());
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out must be a 2-d [M, N] matrix, got shape ", out.sizes());
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), op, ": a [M, K] and b [K, N] must agree in K, got a ", a.sizes(),
                    " and b ", b.sizes());
  TORCH_CHECK_VALUE(out.size(0) == a.size(0) && out.size(1) == b.size(1), op, ": out must have shape [M, N] = [",
                    a.size(0), ", ", b.size(1), "], got ", out.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(out.scalar_type()), op, ": out must be floating point, got ", out.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"a", &a}, {"b", &b}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == out.scalar_type(), op, ": ", name, " must have the dtype of out (",
                     out.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == out.device(), op, ": ", name, " must be on the device of out (", out.device(),
                      "), got ", t->device());
    TORCH_CHECK_VALUE(!may_share_memory(out, *t), op, ": out is written in place and must not share memory with ",
                      name);
  }
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out is written in place and must not have overlapping memory (an expanded view), got strides ",
                    out.strides());
}

// out = beta out + alpha a b through ATen (beta = 0: out is not read).
inline void aten_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha = 1.0) {
  at::Tensor dst = out;  // the same tensor: ATen's out= and in-place forms take it by non-const reference
  if (beta == 0.0 && alpha == 1.0) at::mm_out(dst, a, b);
  else dst.addmm_(a, b, beta, alpha);  // beta = 0: ATen does not read dst either
}

}  // namespace twicediff
