// CUDA kernels of pack_into / unpack_into: one launch copies every (block, row) segment of a list
// of up to kMaxTensors parameter blocks, described by a metadata struct passed as a kernel
// argument; longer lists take more launches. Copies move raw elements of the dtype's width.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "pack_common.h"

namespace twicediff {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kChunk = kThreads * kPerThread;  // elements one CUDA block copies
// 8 KB of metadata: well inside the 32,764-byte kernel-argument limit of CUDA >= 12.1 on sm_70+.
constexpr int kMaxTensors = 160;

struct PackMeta {
  char* block[kMaxTensors];            // block k's data ([B, n_k], contiguous)
  int64_t numel[kMaxTensors];          // n_k
  int64_t column[kMaxTensors];         // col_k
  int64_t first_cta[kMaxTensors + 1];  // prefix sum of CUDA blocks per tensor
  int count;
};

template <typename T, bool kToMatrix>
__global__ void pack_kernel(PackMeta meta, T* __restrict__ mat, int64_t ld, int64_t row_offset) {
  const int64_t cta = blockIdx.x;
  // Which tensor this CUDA block serves: the last k with first_cta[k] <= cta.
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_cta[mid] <= cta) lo = mid; else hi = mid - 1;
  }
  const int64_t n = meta.numel[lo];
  const int64_t chunks_per_row = (n + kChunk - 1) / kChunk;
  const int64_t local = cta - meta.first_cta[lo];
  const int64_t b = local / chunks_per_row;
  const int64_t start = (local % chunks_per_row) * kChunk;
  const int64_t stop = min(n, start + kChunk);
  T* blk = reinterpret_cast<T*>(meta.block[lo]) + b * n;
  T* row = mat + (row_offset + b) * ld + meta.column[lo];
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
    if (kToMatrix) row[i] = blk[i];
    else blk[i] = row[i];
  }
}

template <typename T>
void launch_all(at::TensorList blocks, const at::Tensor& mat, const PackLayout& lay, int64_t row_offset,
                bool to_matrix) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  T* mat_ptr = static_cast<T*>(mat.data_ptr());
  PackMeta meta;
  meta.count = 0;
  int64_t ctas = 0;
  auto flush = [&]() {
    if (meta.count == 0) return;
    meta.first_cta[meta.count] = ctas;
    if (ctas > 0) {
      if (to_matrix) pack_kernel<T, true><<<ctas, kThreads, 0, stream>>>(meta, mat_ptr, mat.stride(0), row_offset);
      else pack_kernel<T, false><<<ctas, kThreads, 0, stream>>>(meta, mat_ptr, mat.stride(0), row_offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    meta.count = 0;
    ctas = 0;
  };
  for (size_t k = 0; k < blocks.size(); ++k) {
    const int64_t n = lay.numel[k];
    if (n == 0) continue;  // empty blocks need no work
    const int64_t need = lay.rows * ((n + kChunk - 1) / kChunk);
    TORCH_CHECK(need < (int64_t{1} << 31) - 1, "pack: block ", k, " is too large for one launch");
    if (meta.count == kMaxTensors || ctas + need >= (int64_t{1} << 31) - 1) flush();
    meta.block[meta.count] = static_cast<char*>(blocks[k].data_ptr());
    meta.numel[meta.count] = n;
    meta.column[meta.count] = lay.column[k];
    meta.first_cta[meta.count] = ctas;
    ++meta.count;
    ctas += need;
  }
  flush();
}

void copy_rows(at::TensorList blocks, const at::Tensor& mat, const PackLayout& lay, int64_t row_offset,
               bool to_matrix) {
  switch (mat.element_size()) {
    case 1: launch_all<uint8_t>(blocks, mat, lay, row_offset, to_matrix); break;
    case 2: launch_all<uint16_t>(blocks, mat, lay, row_offset, to_matrix); break;
    case 4: launch_all<uint32_t>(blocks, mat, lay, row_offset, to_matrix); break;
    case 8: launch_all<uint64_t>(blocks, mat, lay, row_offset, to_matrix); break;
    case 16: launch_all<ulonglong2>(blocks, mat, lay, row_offset, to_matrix); break;
    default: TORCH_CHECK_TYPE(false, "pack: unsupported element size ", mat.element_size());
  }
}

void pack_into_cuda(at::TensorList blocks, const at::Tensor& out, int64_t row_offset) {
  const PackLayout lay = pack_layout("pack_into", blocks, "blocks", out, "out", row_offset);
  if (lay.rows == 0 || out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  if (lay.fast) copy_rows(blocks, out, lay, row_offset, /*to_matrix=*/true);
  else pack_copy_strided(blocks, out, lay, row_offset, /*to_matrix=*/true);
}

void unpack_into_cuda(const at::Tensor& rows, at::TensorList outs) {
  const PackLayout lay = pack_layout("unpack_into", outs, "outs", rows, "rows", 0);
  TORCH_CHECK_VALUE(lay.rows == rows.size(0), "unpack_into: outs have B = ", lay.rows,
                    " rows but rows has ", rows.size(0), " (shape ", shape_str(rows), ")");
  for (size_t k = 0; k < outs.size(); ++k)
    TORCH_CHECK_VALUE(at::has_internal_overlap(outs[k]) != at::MemOverlap::Yes, "unpack_into: outs[", k,
                      "] must not have overlapping memory (an expanded view)");
  if (lay.rows == 0 || rows.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  if (lay.fast) copy_rows(outs, rows, lay, 0, /*to_matrix=*/false);
  else pack_copy_strided(outs, rows, lay, 0, /*to_matrix=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) {
  m.impl("pack_into", &pack_into_cuda);
  m.impl("unpack_into", &unpack_into_cuda);
}

}  // namespace twicediff
