// Argument checks and layout shared by the CPU and CUDA kernels of pack_into / unpack_into.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>
#include <vector>

namespace twicediff {

// Where each parameter block goes in a row of the packed [N, P] matrix.
struct PackLayout {
  int64_t rows = 0;             // B, rows written (or read) in this call
  std::vector<int64_t> numel;   // n_k, elements of one row of block k
  std::vector<int64_t> column;  // col_k, first column of block k
  bool fast = true;             // every block contiguous and the matrix has unit column stride
};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// Checks blocks[k] = [B, *shape_k] against the matrix `mat` = [N, P] with sum_k n_k = P, and
// rows [row_offset, row_offset + B) inside N. `blocks_arg` / `mat_arg` name the arguments.
inline PackLayout pack_layout(const char* op, at::TensorList blocks, const char* blocks_arg,
                              const at::Tensor& mat, const char* mat_arg, int64_t row_offset) {
  TORCH_CHECK_VALUE(mat.dim() == 2, op, ": ", mat_arg, " must be a 2-d [N, P] matrix, got shape ",
                    shape_str(mat));
  TORCH_CHECK_VALUE(blocks.size() > 0, op, ": ", blocks_arg, " must hold at least one tensor, got an empty list");
  TORCH_CHECK_VALUE(row_offset >= 0, op, ": row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK_VALUE(at::has_internal_overlap(mat) != at::MemOverlap::Yes, op, ": ", mat_arg,
                    " must not have overlapping memory (an expanded view), got strides ", mat.strides());
  PackLayout lay;
  lay.fast = mat.stride(1) == 1 || mat.size(1) <= 1;
  lay.numel.reserve(blocks.size());
  lay.column.reserve(blocks.size());
  int64_t col = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const at::Tensor& b = blocks[k];
    TORCH_CHECK_VALUE(b.defined(), op, ": ", blocks_arg, "[", k, "] is undefined");
    TORCH_CHECK_TYPE(b.scalar_type() == mat.scalar_type(), op, ": ", blocks_arg, "[", k, "] has dtype ",
                     b.scalar_type(), " but ", mat_arg, " has dtype ", mat.scalar_type(), "; they must match");
    TORCH_CHECK_VALUE(b.device() == mat.device(), op, ": ", blocks_arg, "[", k, "] is on ", b.device(),
                      " but ", mat_arg, " is on ", mat.device(), "; they must be on the same device");
    TORCH_CHECK_VALUE(b.dim() >= 1, op, ": ", blocks_arg, "[", k,
                      "] must have a leading batch dimension [B, ...], got a 0-d tensor");
    if (k == 0) lay.rows = b.size(0);
    TORCH_CHECK_VALUE(b.size(0) == lay.rows, op, ": every tensor in ", blocks_arg,
                      " must have the same leading size B; ", blocks_arg, "[0] has B = ", lay.rows, " but ",
                      blocks_arg, "[", k, "] has shape ", shape_str(b));
    const int64_t n = lay.rows == 0 ? (b.numel() == 0 ? [&] {
      int64_t p = 1;
      for (int64_t d = 1; d < b.dim(); ++d) p *= b.size(d);
      return p;
    }() : 0) : b.numel() / lay.rows;
    lay.numel.push_back(n);
    lay.column.push_back(col);
    col += n;
    lay.fast = lay.fast && b.is_contiguous();
  }
  TORCH_CHECK_VALUE(col == mat.size(1), op, ": the blocks in ", blocks_arg, " hold ", col,
                    " elements per row but ", mat_arg, " has P = ", mat.size(1), " columns (shape ",
                    shape_str(mat), ")");
  TORCH_CHECK_VALUE(row_offset + lay.rows <= mat.size(0), op, ": rows [", row_offset, ", ",
                    row_offset + lay.rows, ") do not fit in ", mat_arg, ", which has N = ", mat.size(0), " rows");
  return lay;
}

// The general path for any strides: one copy_ per block.
inline void pack_copy_strided(at::TensorList blocks, const at::Tensor& mat, const PackLayout& lay,
                              int64_t row_offset, bool to_matrix) {
  for (size_t k = 0; k < blocks.size(); ++k) {
    if (lay.numel[k] == 0 || lay.rows == 0) continue;
    at::Tensor region = mat.narrow(0, row_offset, lay.rows).narrow(1, lay.column[k], lay.numel[k]);
    at::Tensor block = blocks[k];
    if (to_matrix) {
      region.copy_(block.reshape({lay.rows, lay.numel[k]}));
    } else {
      // view() fails on non-viewable strides; copy through a reshaped view of the region instead.
      std::vector<int64_t> shape(block.sizes().begin(), block.sizes().end());
      block.copy_(region.reshape(shape));
    }
  }
}

}  // namespace twicediff
