// blockwise_contract and blockwise_dot: argument checks and their implementation through ATen
// GEMM / GEMV calls, shared by the CPU (cpu/blockwise.cpp) and CUDA (cuda/blockwise.cu) kernels.
// Each block is one BLAS call on its [rows, n_k] view, accumulated into the result, so that a
// parameter list is contracted without packing it into one matrix first. On CUDA the calls run on
// the current stream (ATen's cuBLAS handle is bound to it).
#pragma once
#include <ATen/ATen.h>

#include <utility>

#include "pack_common.h"

namespace twicediff {

// float32 / float64 everywhere; float16 / bfloat16 too on CUDA, where cuBLAS takes them.
inline void check_blockwise_dtype(const char* op, const at::Tensor& t, const char* arg, size_t k) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble ||
                  (t.is_cuda() && (st == at::kHalf || st == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, op, ": ", arg, "[", k, "] must be float32 or float64",
                   t.is_cuda() ? " (or float16 / bfloat16 on CUDA)" : "", ", got ", st);
}

// Checks lhs[k] = [R, *shape_k] and rhs[k] = [S, *shape_k] (rhs_batched) or rhs[k] = [*shape_k]
// (not rhs_batched): same K, one dtype and one device for all, matching shape_k. Returns (R, S),
// with S = 1 when rhs is not batched.
inline std::pair<int64_t, int64_t> check_block_pairs(const char* op, at::TensorList lhs, const char* lhs_arg,
                                                     at::TensorList rhs, const char* rhs_arg, bool rhs_batched) {
  TORCH_CHECK_VALUE(lhs.size() > 0, op, ": ", lhs_arg, " must hold at least one tensor, got an empty list");
  TORCH_CHECK_VALUE(rhs.size() == lhs.size(), op, ": ", lhs_arg, " and ", rhs_arg,
                    " must hold the same number of blocks; ", lhs_arg, " has ", lhs.size(), " but ", rhs_arg,
                    " has ", rhs.size());
  const at::Tensor& first = lhs[0];
  TORCH_CHECK_VALUE(first.defined(), op, ": ", lhs_arg, "[0] is undefined");
  TORCH_CHECK_VALUE(first.dim() >= 1, op, ": ", lhs_arg, "[0] must have a leading dimension [", lhs_arg,
                    "_rows, ...], got a 0-d tensor");
  const int64_t R = first.size(0);
  int64_t S = 1;
  for (size_t k = 0; k < lhs.size(); ++k) {
    for (int side = 0; side < 2; ++side) {
      const at::Tensor& t = side == 0 ? lhs[k] : rhs[k];
      const char* arg = side == 0 ? lhs_arg : rhs_arg;
      TORCH_CHECK_VALUE(t.defined(), op, ": ", arg, "[", k, "] is undefined");
      check_blockwise_dtype(op, t, arg, k);
      TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": every block must have the same dtype; ",
                       lhs_arg, "[0] has ", first.scalar_type(), " but ", arg, "[", k, "] has ", t.scalar_type());
      TORCH_CHECK_VALUE(t.device() == first.device(), op, ": every block must be on the same device; ", lhs_arg,
                        "[0] is on ", first.device(), " but ", arg, "[", k, "] is on ", t.device());
    }
    const at::Tensor& l = lhs[k];
    const at::Tensor& r = rhs[k];
    TORCH_CHECK_VALUE(l.dim() >= 1 && l.size(0) == R, op, ": every tensor in ", lhs_arg,
                      " must have the same leading size; ", lhs_arg, "[0] has ", R, " rows but ", lhs_arg, "[", k,
                      "] has shape ", shape_str(l));
    const at::IntArrayRef shape = l.sizes().slice(1);
    if (rhs_batched) {
      TORCH_CHECK_VALUE(r.dim() >= 1, op, ": ", rhs_arg, "[", k, "] must have a leading dimension, got a 0-d tensor");
      if (k == 0) S = r.size(0);
      TORCH_CHECK_VALUE(r.size(0) == S, op, ": every tensor in ", rhs_arg, " must have the same leading size; ",
                        rhs_arg, "[0] has ", S, " rows but ", rhs_arg, "[", k, "] has shape ", shape_str(r));
      TORCH_CHECK_VALUE(r.sizes().slice(1) == shape, op, ": ", lhs_arg, "[", k, "] and ", rhs_arg, "[", k,
                        "] must have the same shape after the leading dimension; got ", shape_str(l), " and ",
                        shape_str(r));
    } else {
      TORCH_CHECK_VALUE(r.sizes() == shape, op, ": ", rhs_arg, "[", k, "] must have the shape of ", lhs_arg, "[", k,
                        "] without its leading dimension, ", shape_str(shape), ", got ", shape_str(r));
    }
  }
  return {R, S};
}

// float16 / bfloat16 sums run in float32: each block's product is rounded to the inputs' dtype once
// (cuBLAS accumulates inside it in float32), the running total not at all until the end.
inline bool low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// C[T, V] = sum_k a[k].reshape(T, n_k) @ b[k].reshape(V, n_k)^T: one GEMM per non-empty block.
inline at::Tensor blockwise_contract_gemm(at::TensorList a, at::TensorList b) {
  const auto [T, V] = check_block_pairs("blockwise_contract", a, "a", b, "b", /*rhs_batched=*/true);
  const auto dtype = a[0].scalar_type();
  const bool low = low_precision(dtype);
  at::Tensor c = at::zeros({T, V}, a[0].options().dtype(low ? at::kFloat : dtype));
  if (T > 0 && V > 0) {
    for (size_t k = 0; k < a.size(); ++k) {
      const int64_t n = c10::multiply_integers(a[k].sizes().slice(1));
      if (n == 0) continue;
      if (low) c.add_(at::mm(a[k].reshape({T, n}), b[k].reshape({V, n}).t()));
      else c.addmm_(a[k].reshape({T, n}), b[k].reshape({V, n}).t());
    }
  }
  return low ? c.to(dtype) : c;
}

// z[D] = sum_k <v[k][d], g[k]> = sum_k v[k].reshape(D, n_k) @ g[k].reshape(n_k): one GEMV per block.
inline at::Tensor blockwise_dot_gemv(at::TensorList v, at::TensorList g) {
  const int64_t D = check_block_pairs("blockwise_dot", v, "v", g, "g", /*rhs_batched=*/false).first;
  const auto dtype = v[0].scalar_type();
  const bool low = low_precision(dtype);
  at::Tensor z = at::zeros({D}, v[0].options().dtype(low ? at::kFloat : dtype));
  if (D > 0) {
    for (size_t k = 0; k < v.size(); ++k) {
      const int64_t n = g[k].numel();
      if (n == 0) continue;
      if (low) z.add_(at::mv(v[k].reshape({D, n}), g[k].reshape({n})));
      else z.addmv_(v[k].reshape({D, n}), g[k].reshape({n}));
    }
  }
  return low ? z.to(dtype) : z;
}

}  // namespace twicediff
