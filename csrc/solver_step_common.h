// Argument checks shared by the CPU and CUDA kernels of the fused solver steps (cg_step,
// cg_direction, lissa_step): every [D, P] block of one call has the same shape, floating dtype
// (float32 or float64) and device; the per-row coefficients are float64 [D] on that device.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "util/overlap.h"

#include <initializer_list>
#include <utility>

namespace twicediff {

// `blocks` are (name, tensor) pairs; the first one sets shape, dtype and device. `written` names
// how many of the leading blocks the op writes: they must not overlap themselves or the others.
inline void check_solver_blocks(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> blocks,
                                size_t written) {
  const auto& [first_name, first] = *blocks.begin();
  TORCH_CHECK_VALUE(first->dim() == 2, op, ": ", first_name, " must be a 2-d [D, P] block, got shape ",
                    first->sizes());
  TORCH_CHECK_TYPE(first->scalar_type() == at::kFloat || first->scalar_type() == at::kDouble, op, ": ",
                   first_name, " must be float32 or float64, got ", first->scalar_type());
  size_t i = 0;
  for (const auto& [name, t] : blocks) {
    TORCH_CHECK_VALUE(t->sizes() == first->sizes(), op, ": ", name, " must have the shape of ", first_name, " ",
                      first->sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == first->scalar_type(), op, ": ", name, " must have the dtype of ",
                     first_name, " (", first->scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == first->device(), op, ": ", name, " must be on the device of ", first_name,
                      " (", first->device(), "), got ", t->device());
    if (i < written) {
      TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": ", name,
                        " is written in place and must not have overlapping memory (an expanded view), got strides ",
                        t->strides());
      size_t j = 0;
      for (const auto& [other_name, other] : blocks) {
        TORCH_CHECK_VALUE(j == i || !may_share_memory(*t, *other), op, ": ", name,
                          " is written in place and must not share memory with ", other_name);
        ++j;
      }
    }
    ++i;
  }
}

// A per-row coefficient: float64 [D] on the device of the blocks.
inline void check_row_coefficients(const char* op, const char* name, const at::Tensor& c, const at::Tensor& block) {
  TORCH_CHECK_TYPE(c.scalar_type() == at::kDouble, op, ": ", name, " must be float64 (one coefficient per row), got ",
                   c.scalar_type());
  TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == block.size(0), op, ": ", name, " must have shape [D] = [",
                    block.size(0), "], got ", c.sizes());
  TORCH_CHECK_VALUE(c.device() == block.device(), op, ": ", name, " must be on the device of the blocks (",
                    block.device(), "), got ", c.device());
}

}  // namespace twicediff
