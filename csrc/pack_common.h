// Argument checks and layout shared by the CPU and CUDA kernels of pack / pack_into / unpack_into.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>
#include <vector>

#include "util/overlap.h"
#include "util/shape.h"

namespace twicediff {

// Where each parameter block goes in a row of the packed [N, P] matrix.
struct PackLayout {
  int64_t rows = 0;             // B, rows written (or read) in this call
  int64_t width = 0;            // P = sum_k n_k, elements of one packed row
  std::vector<int64_t> numel;   // n_k, elements of one row of block k
  std::vector<int64_t> column;  // col_k, first column of block k
  bool contiguous = true;       // every block is contiguous
};

// Checks that blocks[k] = [B, *shape_k] share B, dtype and device, and lays them out side by side
// in a row of P = sum_k n_k columns. `blocks_arg` names the argument in messages.
inline PackLayout block_layout(const char* op, at::TensorList blocks, const char* blocks_arg) {
  TORCH_CHECK_VALUE(blocks.size() > 0, op, ": ", blocks_arg, " must hold at least one tensor, got an empty list");
  PackLayout lay;
  lay.numel.reserve(blocks.size());
  lay.column.reserve(blocks.size());
  for (size_t k = 0; k < blocks.size(); ++k) {
    const at::Tensor& b = blocks[k];
    TORCH_CHECK_VALUE(b.defined(), op, ": ", blocks_arg, "[", k, "] is undefined");
    TORCH_CHECK_TYPE(b.scalar_type() == blocks[0].scalar_type(), op, ": every tensor in ", blocks_arg,
                     " must have the same dtype; ", blocks_arg, "[0] has ", blocks[0].scalar_type(), " but ",
                     blocks_arg, "[", k, "] has ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == blocks[0].device(), op, ": every tensor in ", blocks_arg,
                      " must be on the same device; ", blocks_arg, "[0] is on ", blocks[0].device(), " but ",
                      blocks_arg, "[", k, "] is on ", b.device());
    TORCH_CHECK_VALUE(b.dim() >= 1, op, ": ", blocks_arg, "[", k,
                      "] must have a leading batch dimension [B, ...], got a 0-d tensor");
    if (k == 0) lay.rows = b.size(0);
    TORCH_CHECK_VALUE(b.size(0) == lay.rows, op, ": every tensor in ", blocks_arg,
                      " must have the same leading size B; ", blocks_arg, "[0] has B = ", lay.rows, " but ",
                      blocks_arg, "[", k, "] has shape ", shape_str(b));
    const int64_t n = c10::multiply_integers(b.sizes().slice(1));
    lay.numel.push_back(n);
    lay.column.push_back(lay.width);
    lay.width += n;
    lay.contiguous = lay.contiguous && b.is_contiguous();
  }
  return lay;
}

// Checks the matrix `mat` = [N, P] against the blocks' layout, with rows [row_offset,
// row_offset + B) inside N, and that no block shares memory with the rows it is copied to or from.
inline void check_matrix(const char* op, const PackLayout& lay, at::TensorList blocks, const char* blocks_arg,
                         const at::Tensor& mat, const char* mat_arg, int64_t row_offset) {
  TORCH_CHECK_VALUE(mat.dim() == 2, op, ": ", mat_arg, " must be a 2-d [N, P] matrix, got shape ",
                    shape_str(mat));
  TORCH_CHECK_TYPE(blocks[0].scalar_type() == mat.scalar_type(), op, ": ", blocks_arg, " have dtype ",
                   blocks[0].scalar_type(), " but ", mat_arg, " has dtype ", mat.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(blocks[0].device() == mat.device(), op, ": ", blocks_arg, " are on ", blocks[0].device(),
                    " but ", mat_arg, " is on ", mat.device(), "; they must be on the same device");
  TORCH_CHECK_VALUE(row_offset >= 0, op, ": row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK_VALUE(lay.width == mat.size(1), op, ": the blocks in ", blocks_arg, " hold ", lay.width,
                    " elements per row but ", mat_arg, " has P = ", mat.size(1), " columns (shape ",
                    shape_str(mat), ")");
  TORCH_CHECK_VALUE(row_offset + lay.rows <= mat.size(0), op, ": rows [", row_offset, ", ",
                    row_offset + lay.rows, ") do not fit in ", mat_arg, ", which has N = ", mat.size(0), " rows");
  TORCH_CHECK_VALUE(at::has_internal_overlap(mat) != at::MemOverlap::Yes, op, ": ", mat_arg,
                    " must not have overlapping memory (an expanded view), got strides ", mat.strides());
  for (size_t k = 0; k < blocks.size(); ++k)
    TORCH_CHECK_VALUE(!may_share_memory(mat, blocks[k]), op, ": ", blocks_arg, "[", k, "] shares memory with ",
                      mat_arg, "; pass a copy");
}

// The checks of unpack_into(rows, outs): outs[k] = [B, *shape_k] with B the rows of `rows` [B, P].
inline PackLayout unpack_layout(const at::Tensor& rows, at::TensorList outs) {
  const PackLayout lay = block_layout("unpack_into", outs, "outs");
  check_matrix("unpack_into", lay, outs, "outs", rows, "rows", 0);
  TORCH_CHECK_VALUE(lay.rows == rows.size(0), "unpack_into: outs have B = ", lay.rows, " rows but rows has ",
                    rows.size(0), " (shape ", shape_str(rows), ")");
  for (size_t k = 0; k < outs.size(); ++k)
    TORCH_CHECK_VALUE(at::has_internal_overlap(outs[k]) != at::MemOverlap::Yes, "unpack_into: outs[", k,
                      "] must not have overlapping memory (an expanded view), got strides ", outs[k].strides());
  return lay;
}

// True when the raw row copies apply: contiguous blocks and rows with unit column stride.
inline bool rows_copyable(const PackLayout& lay, const at::Tensor& mat) {
  return lay.contiguous && (mat.stride(1) == 1 || mat.size(1) <= 1) &&
         (mat.size(0) <= 1 || mat.stride(0) >= mat.size(1));
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
      block.copy_(region.reshape(block.sizes()));
    }
  }
}

// The three ops around a device's raw row copies. `Device` provides
//   copy_rows(blocks, mat, lay, row_offset, to_matrix)   the copies where rows_copyable holds
//   device_guard(device)                                  an object that makes `device` current while
//                                                         it lives, taken after the checks (which name
//                                                         the argument on another device)
template <class Device>
struct PackOps {
  static void pack_into(at::TensorList blocks, const at::Tensor& out, int64_t row_offset) {
    const PackLayout lay = block_layout("pack_into", blocks, "blocks");
    check_matrix("pack_into", lay, blocks, "blocks", out, "out", row_offset);
    if (lay.rows == 0 || out.numel() == 0) return;
    [[maybe_unused]] const auto guard = Device::device_guard(out.device());
    if (rows_copyable(lay, out)) Device::copy_rows(blocks, out, lay, row_offset, /*to_matrix=*/true);
    else pack_copy_strided(blocks, out, lay, row_offset, /*to_matrix=*/true);
  }

  static at::Tensor pack(at::TensorList blocks) {
    const PackLayout lay = block_layout("pack", blocks, "blocks");
    [[maybe_unused]] const auto guard = Device::device_guard(blocks[0].device());
    at::Tensor out = at::empty({lay.rows, lay.width}, blocks[0].options());
    if (out.numel() == 0) return out;
    if (lay.contiguous) Device::copy_rows(blocks, out, lay, 0, /*to_matrix=*/true);
    else pack_copy_strided(blocks, out, lay, 0, /*to_matrix=*/true);
    return out;
  }

  static void unpack_into(const at::Tensor& rows, at::TensorList outs) {
    const PackLayout lay = unpack_layout(rows, outs);
    if (lay.rows == 0 || rows.numel() == 0) return;
    [[maybe_unused]] const auto guard = Device::device_guard(rows.device());
    if (rows_copyable(lay, rows)) Device::copy_rows(outs, rows, lay, 0, /*to_matrix=*/false);
    else pack_copy_strided(outs, rows, lay, 0, /*to_matrix=*/false);
  }
};

}  // namespace twicediff
