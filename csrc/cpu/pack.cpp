// CPU kernels of pack / pack_into / unpack_into: one parallel pass of copies over all blocks.
//
// The B x P packed elements are split into equal contiguous ranges, one per thread (row-major over
// the packed rows), so that work is balanced whatever the shapes (one huge block, many tiny ones,
// few rows or very many) and each thread streams through one contiguous stretch of the matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "pack_common.h"
#include "util/no_guard.h"

namespace twicediff {
namespace {

// Below this many bytes per thread a copy is not worth waking threads for.
constexpr int64_t kGrainBytes = 256 * 1024;

// Copies n bytes between disjoint buffers. Runs of up to kInlineBytes (the rows of most parameter
// blocks) are moved by inlined fixed-size copies, the last one overlapping the one before it, which
// costs a fraction of a memcpy call with its size dispatch; longer runs call memcpy.
constexpr int64_t kInlineBytes = 1024;
inline void copy_bytes(char* dst, const char* src, int64_t n) {
  if (n > kInlineBytes) {
    std::memcpy(dst, src, n);
  } else if (n >= 32) {
    for (int64_t i = 0; i + 32 < n; i += 32) std::memcpy(dst + i, src + i, 32);
    std::memcpy(dst + n - 32, src + n - 32, 32);
  } else if (n >= 16) {
    std::memcpy(dst, src, 16);
    std::memcpy(dst + n - 16, src + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else if (n > 0) {
    dst[0] = src[0];
    if (n > 1) std::memcpy(dst + n - 2, src + n - 2, 2);
  }
}

void copy_rows(at::TensorList blocks, const at::Tensor& mat, const PackLayout& lay, int64_t row_offset,
               bool to_matrix) {
  const int64_t B = lay.rows;
  const int64_t P = lay.width;
  const int64_t K = static_cast<int64_t>(blocks.size());
  const int64_t elem = static_cast<int64_t>(mat.element_size());
  char* const base = static_cast<char*>(mat.data_ptr()) + row_offset * mat.stride(0) * elem;
  const int64_t ld = mat.stride(0) * elem;
  std::vector<char*> data(K);
  for (int64_t k = 0; k < K; ++k) data[k] = static_cast<char*>(blocks[k].data_ptr());

  // Columns [c0, c1) of packed row b, block by block from block k (the first that reaches c0).
  auto copy_span = [&](int64_t b, int64_t c0, int64_t c1, int64_t k) {
    char* row = base + b * ld;
    for (; k < K && lay.column[k] < c1; ++k) {
      const int64_t s = std::max(c0, lay.column[k]);
      const int64_t e = std::min(c1, lay.column[k] + lay.numel[k]);
      if (e <= s) continue;  // empty block
      char* blk = data[k] + (b * lay.numel[k] + s - lay.column[k]) * elem;
      if (to_matrix) copy_bytes(row + s * elem, blk, (e - s) * elem);
      else copy_bytes(blk, row + s * elem, (e - s) * elem);
    }
  };
  at::parallel_for(0, B * P, std::max<int64_t>(1, kGrainBytes / elem), [&](int64_t begin, int64_t end) {
    const int64_t b0 = begin / P, b1 = (end - 1) / P;  // first and last row touched
    for (int64_t b = b0; b <= b1; ++b) {
      const int64_t c0 = b == b0 ? begin % P : 0;
      const int64_t c1 = b == b1 ? (end - 1) % P + 1 : P;
      // The first block reaching c0: the first k with col_k + n_k > c0.
      const int64_t k = c0 == 0 ? 0
                                : std::upper_bound(lay.column.begin(), lay.column.end(), c0) - lay.column.begin() - 1;
      copy_span(b, c0, c1, k);
    }
  });
}

// The device of PackOps (pack_common.h).
struct CpuPack {
  static NoGuard device_guard(at::Device) { return {}; }
  static constexpr auto copy_rows = &twicediff::copy_rows;
};

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("pack", &PackOps<CpuPack>::pack);
  m.impl("pack_into", &PackOps<CpuPack>::pack_into);
  m.impl("unpack_into", &PackOps<CpuPack>::unpack_into);
}

}  // namespace twicediff
