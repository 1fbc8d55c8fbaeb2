// Scratch memory for the intermediates of one native op call, kept between calls on the CPU.
//
// A call of mlp_hvp needs tens to hundreds of MB of short-lived [N, D*width] blocks. Fresh from the
// CPU allocator (glibc maps large blocks anew each time), every page of them is faulted in and
// zeroed by the kernel on first touch, a sizeable share of a call's time on the CPU (NOTE: measured
// in benchmarks/results/native_hvp_model_a.md).
// An Arena hands out all of a call's intermediates from one buffer (bump allocation, 64-byte
// aligned), and on the CPU that buffer is cached for the next call, up to kCacheCap bytes - the
// role CUDA's caching allocator plays on the GPU, where the Arena just calls at::empty.
//
// The cache holds one buffer per slot. A call that splits its directions across threads gives each
// thread's Arena its own slot (slot t for part t), so that every part finds its buffer again on the
// next call. A slot's buffer is lent to one Arena at a time: an Arena that finds it taken (a
// concurrent call in another thread) gets a buffer of its own. An Arena that needs more than its
// buffer holds takes the overflow from at::empty, and the next one in that slot starts with a buffer
// of the size it needed. release() drops every cached buffer (twicediff.release_native_scratch()).
//
// Blocks are handed out like a stack: mark() notes the top, and release_to(mark) gives back every
// block taken since, for the blocks after it to reuse. A call that drops each temporary (a layer's
// copy of its directions, its weight-gradient GEMM's output) as soon as it is consumed then needs a
// buffer of its largest layer's temporaries, not of all layers' together. The buffer a slot keeps
// has the size of the highest top an Arena of it reached.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

namespace twicediff {
namespace scratch {

constexpr int64_t kAlign = 64;                     // bytes; every block starts on a cache line
constexpr int64_t kCacheCap = int64_t(1) << 30;    // the most bytes kept between calls, all slots together
constexpr int kSlots = 64;                         // slot numbers are taken modulo this

struct Slot {
  at::Tensor buffer;     // uint8 [bytes] on the CPU, or undefined
  int64_t wanted = 0;    // the most bytes one Arena of this slot has needed since the last release()
};

struct Cache {
  std::mutex mutex;
  Slot slots[kSlots];
};

inline Cache& cache() {
  static Cache c;
  return c;
}

// Bytes held between calls, all slots together (0 when nothing is cached). Call with the mutex held.
inline int64_t held_bytes_locked() {
  int64_t total = 0;
  for (const Slot& s : cache().slots) total += s.buffer.defined() ? s.buffer.numel() : 0;
  return total;
}

inline int64_t cached_bytes() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return held_bytes_locked();
}

// Drops the cached buffers (calls in flight keep theirs until they end).
inline void release() {
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(cache().mutex);
  for (Slot& s : cache().slots) {
    dropped.push_back(std::move(s.buffer));
    s.buffer = at::Tensor();
    s.wanted = 0;
  }
}

class Arena {
 public:
  // cached: take the buffer from, and give it back to, slot `slot` of the process-wide cache (the
  // CPU); else every block comes from at::empty on `device`.
  Arena(c10::Device device, bool cached, int64_t slot = 0)
      : device_(device), cached_(cached), slot_(static_cast<int>(slot % kSlots)) {
    if (!cached_) return;
    int64_t wanted = 0;
    {
      std::lock_guard<std::mutex> lock(cache().mutex);
      std::swap(buffer_, cache().slots[slot_].buffer);
      wanted = cache().slots[slot_].wanted;
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
    Slot& s = cache().slots[slot_];
    s.wanted = std::max(s.wanted, peak_);
    const int64_t held = s.buffer.defined() ? s.buffer.numel() : 0;
    if (buffer_.defined() && buffer_.numel() > held &&
        held_bytes_locked() - held + buffer_.numel() <= kCacheCap)
      std::swap(buffer_, s.buffer);
  }

  // An uninitialised contiguous tensor of `shape` and `dtype`, valid until the Arena ends.
  at::Tensor take(at::IntArrayRef shape, at::ScalarType dtype) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    const int64_t bytes = numel * static_cast<int64_t>(at::elementSize(dtype));
    const int64_t start = (used_ + kAlign - 1) / kAlign * kAlign;
    used_ = start + bytes;
    peak_ = std::max(peak_, used_);
    if (bytes > 0 && buffer_.defined() && used_ <= buffer_.numel())
      return buffer_.narrow(0, start, bytes).view(dtype).view(shape);
    return at::empty(shape, at::TensorOptions().dtype(dtype).device(device_));
  }

  // The top of the stack of blocks handed out so far.
  int64_t mark() const { return used_; }

  // Gives back every block taken since `mark` (none of them may be used again): the next blocks
  // reuse their bytes. Blocks that overflowed the buffer came from at::empty and are freed when
  // their last reference goes.
  void release_to(int64_t mark) { used_ = std::min(used_, mark); }

 private:
  c10::Device device_;
  bool cached_;
  int slot_;
  at::Tensor buffer_;
  int64_t used_ = 0;  // the top: bytes handed out and not given back, as if all came from the buffer
  int64_t peak_ = 0;  // the highest top so far
};

}  // namespace scratch
}  // namespace twicediff
