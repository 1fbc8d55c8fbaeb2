// CUDA kernel of gemm_: cuBLAS through ATen on the current stream (see gemm_common.h), under a
// guard for out's device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gemm_common.h"

namespace twicediff {
namespace {

void gemm_op_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  check_gemm_args("gemm_", out, a, b);  // one device for all three before the guard takes it
  const c10::cuda::CUDAGuard guard(out.device());
  aten_gemm(out, a, b, beta, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) { m.impl("gemm_", &gemm_op_cuda); }

}  // namespace twicediff
