// CPU kernels of pack / pack_into / unpack_into: one parallel pass of memcpy over all blocks.
//
// The B x P packed elements are split into equal contiguous ranges, one per thread (row-major over
// the packed rows), so that work is balanced whatever the shapes (one huge block, many tiny ones,
// few rows or very many) and each thread streams through one contiguous stretch of the matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "pack_common.h"

namespace twicediff {
namespace {

// Below this many bytes per thread a copy is not worth waking threads for.
constexpr int64_t kGrainBytes = 256 * 1024;
// Copies larger than this (about a server's last-level cache) write with non-temporal stores.
constexpr int64_t kStreamingBytes = 16 << 20;

// memcpy with non-temporal stores: the destination lines bypass the caches and are not read for
// ownership first, which saves a third of the memory traffic of a copy much larger than the cache.
// The caller issues the store fence (_mm_sfence) once its copies are done.
void copy_streaming(char* dst, const char* src, int64_t len) {
#if defined(__SSE2__)
  const int64_t head = std::min<int64_t>(len, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  len -= head;
  for (; len >= 64; len -= 64, dst += 64, src += 64) {
    const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i x3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), x0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), x1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), x2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), x3);
  }
#endif
  std::memcpy(dst, src, len);
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

  const bool streaming = B * P * elem >= kStreamingBytes;
  at::parallel_for(0, B * P, std::max<int64_t>(1, kGrainBytes / elem), [&](int64_t begin, int64_t end) {
    int64_t b = begin / P, c = begin % P;
    // The block holding column c: the last k with col_k <= c (skips empty blocks at column c).
    int64_t k = std::upper_bound(lay.column.begin(), lay.column.end(), c) - lay.column.begin() - 1;
    for (int64_t pos = begin; pos < end;) {
      const int64_t in_block = c - lay.column[k];
      const int64_t len = std::min(lay.numel[k] - in_block, end - pos);
      char* row = base + b * ld + c * elem;
      char* blk = data[k] + (b * lay.numel[k] + in_block) * elem;
      char* dst = to_matrix ? row : blk;
      const char* src = to_matrix ? blk : row;
      if (streaming) copy_streaming(dst, src, len * elem);
      else std::memcpy(dst, src, len * elem);
      pos += len;
      c += len;
      if (c == P) {
        c = 0;
        ++b;
        k = 0;
      } else if (c == lay.column[k] + lay.numel[k]) {
        ++k;
      }
      while (k < K && lay.numel[k] == 0) ++k;  // empty blocks hold no column
    }
#if defined(__SSE2__)
    if (streaming) _mm_sfence();  // make the streamed stores visible before the task ends
#endif
  });
}

void pack_into_cpu(at::TensorList blocks, const at::Tensor& out, int64_t row_offset) {
  const PackLayout lay = block_layout("pack_into", blocks, "blocks");
  check_matrix("pack_into", lay, blocks, "blocks", out, "out", row_offset);
  if (lay.rows == 0 || out.numel() == 0) return;
  if (rows_copyable(lay, out)) copy_rows(blocks, out, lay, row_offset, /*to_matrix=*/true);
  else pack_copy_strided(blocks, out, lay, row_offset, /*to_matrix=*/true);
}

at::Tensor pack_cpu(at::TensorList blocks) {
  const PackLayout lay = block_layout("pack", blocks, "blocks");
  at::Tensor out = at::empty({lay.rows, lay.width}, blocks[0].options());
  if (out.numel() == 0) return out;
  if (lay.contiguous) copy_rows(blocks, out, lay, 0, /*to_matrix=*/true);
  else pack_copy_strided(blocks, out, lay, 0, /*to_matrix=*/true);
  return out;
}

void unpack_into_cpu(const at::Tensor& rows, at::TensorList outs) {
  const PackLayout lay = unpack_layout(rows, outs);
  if (lay.rows == 0 || rows.numel() == 0) return;
  if (rows_copyable(lay, rows)) copy_rows(outs, rows, lay, 0, /*to_matrix=*/false);
  else pack_copy_strided(outs, rows, lay, 0, /*to_matrix=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("pack_into", &pack_into_cpu);
  m.impl("unpack_into", &unpack_into_cpu);
}

}  // namespace twicediff
