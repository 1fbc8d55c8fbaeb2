// GEMMs of the CPU kernels: oneDNN's matmul for float32 where torch carries it, ATen's (MKL or
// OpenBLAS) otherwise. See cpu/gemm.cpp.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace twicediff {
namespace cpu {

// out = beta * out + alpha * a b for 2-d a [M, K], b [K, N] and out [M, N] of their dtype (beta = 0:
// out's contents are not read).
void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha = 1.0);

// Which library takes float32 GEMMs in this process now: "onednn" or "blas".
std::string gemm_backend();

// oneDNN's error message when it refused a float32 GEMM in this process ("" when it never did).
std::string gemm_refusal();

}  // namespace cpu
}  // namespace twicediff
