// CPU kernels of blockwise_contract / blockwise_dot: one BLAS call per parameter block through ATen
// (see blockwise_common.h); BLAS parallelizes each call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "blockwise_common.h"

namespace twicediff {

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("blockwise_contract", &blockwise_contract_gemm);
  m.impl("blockwise_dot", &blockwise_dot_gemv);
}

}  // namespace twicediff
