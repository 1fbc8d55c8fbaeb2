// CUDA kernels of blockwise_contract / blockwise_dot: one cuBLAS call per parameter block through
// ATen on the current stream (see blockwise_common.h), under a guard for the inputs' device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blockwise_common.h"

namespace twicediff {
namespace {

// The guard takes the device of the first block when it is a CUDA tensor; the shared checks reject
// a list whose blocks are on different devices.
c10::optional<at::Device> first_cuda_device(at::TensorList blocks) {
  if (blocks.empty() || !blocks[0].defined() || !blocks[0].is_cuda()) return c10::nullopt;
  return blocks[0].device();
}

at::Tensor blockwise_contract_cuda(at::TensorList a, at::TensorList b) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(a));
  return blockwise_contract_gemm(a, b);
}

at::Tensor blockwise_dot_cuda(at::TensorList v, at::TensorList g) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(v));
  return blockwise_dot_gemv(v, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) {
  m.impl("blockwise_contract", &blockwise_contract_cuda);
  m.impl("blockwise_dot", &blockwise_dot_cuda);
}

}  // namespace twicediff
