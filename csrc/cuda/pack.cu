// CUDA kernels of pack / pack_into / unpack_into: one launch copies every block of a list of up to
// kMaxTensors parameter blocks, described by a metadata struct passed as a kernel argument; longer
// lists take more launches. Copies move raw units: 16-byte vectors when a block's source and
// destination rows are all 16-byte aligned, else elements of the dtype's width.
//
// Block k is the contiguous [B, u_k] array of units (u_k units per row), flattened; each CUDA block
// copies kChunk consecutive units of it, so rows of any length (5 units or 5 million) keep every
// thread busy, and the CUDA blocks of all tensors are numbered one after the other.
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
constexpr int64_t kChunk = kThreads * kPerThread;  // units one CUDA block copies
constexpr int64_t kMaxCtas = (int64_t{1} << 31) - 1;  // grid x limit
// Blocks one launch takes: PackMeta is then 5,296 bytes (5,320 with pack_kernel's other arguments),
// well inside the kernel-argument limit below.
constexpr int kMaxTensors = 160;
// The most bytes of kernel arguments CUDA >= 12.1 passes to a kernel on sm_70 and newer.
constexpr size_t kMaxKernelArgBytes = 32764;

struct PackMeta {
  char* block[kMaxTensors];            // block k's data ([B, n_k], contiguous)
  int64_t units[kMaxTensors];          // u_k, units per row (16-byte vectors or elements)
  int64_t column[kMaxTensors];         // byte offset of block k in a packed row
  int64_t first_cta[kMaxTensors + 1];  // prefix sum of CUDA blocks per tensor
  bool vec[kMaxTensors];               // units are 16-byte vectors
  int count;
};
static_assert(sizeof(PackMeta) + sizeof(char*) + 2 * sizeof(int64_t) <= kMaxKernelArgBytes,
              "pack_kernel's arguments (PackMeta, mat, ld_bytes, rows) exceed CUDA's kernel-argument limit: "
              "lower kMaxTensors");

// Copies units [start, stop) of the flattened [B, u] block between the block and its rows.
template <typename U, bool kToMatrix>
__device__ __forceinline__ void copy_units(char* block, char* rows, int64_t ld_bytes, int64_t u, int64_t start,
                                           int64_t stop) {
  int64_t j = start + threadIdx.x;
  if (j >= stop) return;
  int64_t b = j / u, i = j - b * u;
  const int64_t step_b = kThreads / u, step_i = kThreads % u;  // advance (b, i) by kThreads units
  U* blk = reinterpret_cast<U*>(block);
  for (; j < stop; j += kThreads) {
    U* row = reinterpret_cast<U*>(rows + b * ld_bytes);
    if (kToMatrix) row[i] = blk[j];
    else blk[j] = row[i];
    b += step_b;
    i += step_i;
    if (i >= u) {
      i -= u;
      ++b;
    }
  }
}

template <typename T, bool kToMatrix>
__global__ void pack_kernel(PackMeta meta, char* mat, int64_t ld_bytes, int64_t rows) {
  const int64_t cta = blockIdx.x;
  // Which tensor this CUDA block serves: the last k with first_cta[k] <= cta.
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_cta[mid] <= cta) lo = mid; else hi = mid - 1;
  }
  const int64_t u = meta.units[lo];
  const int64_t start = (cta - meta.first_cta[lo]) * kChunk;
  const int64_t stop = min(rows * u, start + kChunk);
  char* dst = mat + meta.column[lo];
  if (meta.vec[lo]) copy_units<uint4, kToMatrix>(meta.block[lo], dst, ld_bytes, u, start, stop);
  else copy_units<T, kToMatrix>(meta.block[lo], dst, ld_bytes, u, start, stop);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch_all(at::TensorList blocks, const at::Tensor& mat, const PackLayout& lay, int64_t row_offset,
                bool to_matrix) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int64_t elem = sizeof(T);
  const int64_t ld_bytes = mat.stride(0) * elem;
  char* rows = static_cast<char*>(mat.data_ptr()) + row_offset * ld_bytes;  // row b of this call at rows + b * ld
  const bool rows_aligned = aligned16(rows) && (lay.rows == 1 || ld_bytes % 16 == 0);
  PackMeta meta;
  meta.count = 0;
  int64_t ctas = 0;
  auto flush = [&]() {
    if (meta.count == 0) return;
    meta.first_cta[meta.count] = ctas;
    if (to_matrix) pack_kernel<T, true><<<ctas, kThreads, 0, stream>>>(meta, rows, ld_bytes, lay.rows);
    else pack_kernel<T, false><<<ctas, kThreads, 0, stream>>>(meta, rows, ld_bytes, lay.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta.count = 0;
    ctas = 0;
  };
  for (size_t k = 0; k < blocks.size(); ++k) {
    const int64_t n = lay.numel[k];
    if (n == 0) continue;  // empty blocks need no work
    char* data = static_cast<char*>(blocks[k].data_ptr());
    const int64_t col_bytes = lay.column[k] * elem;
    const bool vec = elem < 16 && rows_aligned && aligned16(data) && (n * elem) % 16 == 0 && col_bytes % 16 == 0;
    const int64_t u = vec ? n * elem / 16 : n;
    const int64_t need = (lay.rows * u + kChunk - 1) / kChunk;
    TORCH_CHECK(need < kMaxCtas, "pack: block ", k, " (", lay.rows, " x ", n, " elements) is too large for one launch");
    if (meta.count == kMaxTensors || ctas + need >= kMaxCtas) flush();
    meta.block[meta.count] = data;
    meta.units[meta.count] = u;
    meta.column[meta.count] = col_bytes;
    meta.first_cta[meta.count] = ctas;
    meta.vec[meta.count] = vec;
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
    case 16: launch_all<uint4>(blocks, mat, lay, row_offset, to_matrix); break;
    default: TORCH_CHECK_TYPE(false, "pack: unsupported element size ", mat.element_size());
  }
}

// The device of PackOps (pack_common.h).
struct CudaPack {
  static c10::cuda::CUDAGuard device_guard(at::Device device) { return c10::cuda::CUDAGuard(device); }
  static constexpr auto copy_rows = &twicediff::copy_rows;
};

}  // namespace

TORCH_LIBRARY_IMPL(twicediff, CUDA, m) {
  m.impl("pack", &PackOps<CudaPack>::pack);
  m.impl("pack_into", &PackOps<CudaPack>::pack_into);
  m.impl("unpack_into", &PackOps<CudaPack>::unpack_into);
}

}  // namespace twicediff
