// Scratch memory for the intermediates of one native op call, kept between calls on the CPU.
//
// A call of mlp_hvp needs tens to hundreds of MB of short-lived [N, D*width] blocks. Fresh from the
// CPU allocator (glibc maps large blocks anew each time), every page of them is faulted in and
// zeroed by the kernel on first touch: on model (a) of issue 3 that cost about 20% of the call.
// An Arena hands out all of a call's intermediates from one buffer (bump allocation, 64-byte
// aligned), and on the CPU that buffer is cached for the next call, up to kCacheCap bytes - the
// role CUDA's caching allocator plays on the GPU, where the Arena just calls at::empty.
//
// One buffer is cached process-wide and lent to one call at a time: a call that finds it taken (a
// concurrent call in another thread) gets a buffer of its own. A call that needs more than the
// cached buffer holds takes the overflow from at::empty, and the next call starts with a buffer of
// the size this one needed. release() drops the cached buffer (twicediff.release_native_scratch()).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>
#include <utility>

namespace twicediff {
namespace scratch {

constexpr int64_t kAlign = 64;                     // bytes; every block starts on a cache line
constexpr int64_t kCacheCap = int64_t(1) << 30;    // the most bytes kept between calls

struct Cache {
  std::mutex mutex;
  at::Tensor buffer;     // uint8 [bytes] on the CPU, or undefined
  int64_t wanted = 0;    // the most bytes one call has needed since the last release()
};

inline Cache& cache() {
  static Cache c;
  return c;
}

// Bytes held between calls (0 when nothing is cached).
inline int64_t cached_bytes() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().buffer.defined() ? cache().buffer.numel() : 0;
}

// Drops the cached buffer (calls in flight keep theirs until they end).
inline void release() {
  at::Tensor dropped;
  std::lock_guard<std::mutex> lock(cache().mutex);
  std::swap(dropped, cache().buffer);
  cache().wanted = 0;
}

class Arena {
 public:
  // cached: take the buffer from, and give it back to, the process-wide cache (the CPU); else every
  // block comes from at::empty on `device`.
  Arena(c10::Device device, bool cached) : device_(device), cached_(cached) {
    if (!cached_) return;
    int64_t wanted = 0;
    {
      std::lock_guard<std::mutex> lock(cache().mutex);
      std::swap(buffer_, cache().buffer);
      wanted = cache().wanted;
    }
    if (wanted <= kCacheCap && (!buffer_.defined() || buffer_.numel() < wanted)) {
      buffer_ = at::Tensor();  // free the small one before taking the larger
      if (wanted > 0) buffer_ = at::empty({wanted}, at::TensorOptions().dtype(at::kByte).device(device_));
    }
  }

  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  ~Arena() {
    if (!cached_) return;
    std::lock_guard<std::mutex> lock(cache().mutex);
    cache().wanted = std::max(cache().wanted, used_);
    if (buffer_.defined() && buffer_.numel() <= kCacheCap &&
        (!cache().buffer.defined() || cache().buffer.numel() < buffer_.numel()))
      std::swap(buffer_, cache().buffer);
  }

  // An uninitialised contiguous tensor of `shape` and `dtype`, valid until the Arena ends.
  at::Tensor take(at::IntArrayRef shape, at::ScalarType dtype) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    const int64_t bytes = numel * static_cast<int64_t>(at::elementSize(dtype));
    const int64_t start = (used_ + kAlign - 1) / kAlign * kAlign;
    used_ = start + bytes;
    if (bytes > 0 && buffer_.defined() && used_ <= buffer_.numel())
      return buffer_.narrow(0, start, bytes).view(dtype).view(shape);
    return at::empty(shape, at::TensorOptions().dtype(dtype).device(device_));
  }

 private:
  c10::Device device_;
  bool cached_;
  at::Tensor buffer_;
  int64_t used_ = 0;  // bytes handed out so far, as if all came from the buffer
};

}  // namespace scratch
}  // namespace twicediff
