// The one memory-sharing rule of the ops that write in place (pack_into, gemm_, the solver steps).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace twicediff {

// Whether a and b may share memory: views of one storage that are not provably disjoint.
// get_overlap_status answers TooHard for any non-contiguous view, even of another allocation, so
// the storage is compared first; within one storage, TooHard counts as shared.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.numel() > 0 && b.numel() > 0 && a.storage().is_alias_of(b.storage()) &&
         at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

}  // namespace twicediff
