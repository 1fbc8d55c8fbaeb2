// CPU kernels of pack_into / unpack_into: one parallel pass of row-sized memcpy over all blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "pack_common.h"

namespace twicediff {
namespace {

// Copies row b of block k between the block and the matrix; tasks are (k, b) pairs.
void copy_rows(at::TensorList blocks, const at::Tensor& mat, const PackLayout& lay, int64_t row_offset,
               bool to_matrix) {
  const int64_t K = static_cast<int64_t>(blocks.size());
  const int64_t B = lay.rows;
  const size_t elem = mat.element_size();
  char* base = static_cast<char*>(mat.data_ptr());
  const int64_t ld = mat.stride(0);
  const int64_t total_bytes = mat.size(1) * B * static_cast<int64_t>(elem);
  // Small copies are not worth waking threads for.
  const int64_t grain = std::max<int64_t>(1, (K * B) * 65536 / std::max<int64_t>(total_bytes, 1));
  at::parallel_for(0, K * B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / B, b = task % B;
      const int64_t n = lay.numel[k];
      if (n == 0) continue;
      char* row = base + ((row_offset + b) * ld + lay.column[k]) * elem;
      char* blk = static_cast<char*>(blocks[k].data_ptr()) + b * n * elem;
      if (to_matrix) std::memcpy(row, blk, n * elem);
      else std::memcpy(blk, row, n * elem);
    }
  });
}

void pack_into_cpu(at::TensorList blocks, const at::Tensor& out, int64_t row_offset) {
  const PackLayout lay = pack_layout("pack_into", blocks, "blocks", out, "out", row_offset);
  if (lay.rows == 0 || out.numel() == 0) return;
  if (lay.fast) copy_rows(blocks, out, lay, row_offset, /*to_matrix=*/true);
  else pack_copy_strided(blocks, out, lay, row_offset, /*to_matrix=*/true);
}

void unpack_into_cpu(const at::Tensor& rows, at::TensorList outs) {
  const PackLayout lay = pack_layout("unpack_into", outs, "outs", rows, "rows", 0);
  TORCH_CHECK_VALUE(lay.rows == rows.size(0), "unpack_into: outs have B = ", lay.rows,
                    " rows but rows has ", rows.size(0), " (shape ", shape_str(rows), ")");
  for (size_t k = 0; k < outs.size(); ++k)
    TORCH_CHECK_VALUE(at::has_internal_overlap(outs[k]) != at::MemOverlap::Yes, "unpack_into: outs[", k,
                      "] must not have overlapping memory (an expanded view)");
  if (lay.rows == 0 || rows.numel() == 0) return;
  if (lay.fast) copy_rows(outs, rows, lay, 0, /*to_matrix=*/false);
  else pack_copy_strided(outs, rows, lay, 0, /*to_matrix=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("pack_into", &pack_into_cpu);
  m.impl("unpack_into", &unpack_into_cpu);
}

}  // namespace twicediff
