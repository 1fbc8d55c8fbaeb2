// The CPU block cache of the generic engines' products: see block_cache.h for why and how.
#include "cpu/block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace twicediff {
namespace block_cache {
namespace {

struct Block {
  c10::DataPtr inner;  // the replaced allocator's pointer: owns the memory, frees it when destroyed
  int64_t bytes = 0;
};

// Every pointer this allocator hands out is simple (its context is its address, its deleter
// free_block), as torch's raw_allocate / raw_deallocate, which some CPU kernels use for their
// buffers, require. The blocks it caches are found again by address.
class Cache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const auto bytes = static_cast<int64_t>(n);
    c10::Allocator* base = nullptr;
    Block block;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      base = base_ != nullptr ? base_ : c10::GetDefaultCPUAllocator();
      // Outside a scope this runs only for a storage made in one that grows after it ended.
      if (bytes < kMinBytes || depth_ == 0) return base->allocate(n);
      take_locked(bytes, &block);
    }
    if (!block.inner) block = Block{base->allocate(n), bytes};  // a new block, allocated outside the lock
    void* data = block.inner.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(data, std::move(block));
    }
    return c10::DataPtr(data, data, &Cache::free_block, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Cache::free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_++ > 0) return;
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != this) {
      base_ = current;
      base_raw_deleter_ = current->raw_deleter();
    }
    // Priority 0 is torch's default allocator's; an allocator set with a higher one keeps its place.
    c10::SetCPUAllocator(this, 0);
    installed_ = c10::GetCPUAllocator() == this;
  }

  void exit() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ == 0 || --depth_ > 0) return;
    if (installed_ && c10::GetCPUAllocator() == this) c10::SetCPUAllocator(base_, 0);
    installed_ = false;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  void release() {
    std::vector<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      held_ = 0;
    }
    // dropped's blocks are freed here, outside the lock, by the replaced allocator's deleters.
  }

  static Cache& instance() {
    // Never destroyed: storages made in a scope keep a pointer to it as their allocator, and their
    // blocks may die during interpreter shutdown.
    static Cache* cache = new Cache();
    return *cache;
  }

 private:
  static void free_block(void* data) { instance().give_back(data); }

  // Moves the held block that fits `bytes` most closely, at most a quarter larger, into *out.
  void take_locked(int64_t bytes, Block* out) {
    const int64_t most = bytes + bytes / 4;
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const int64_t b = free_[i].bytes;
      if (b >= bytes && b <= most && (best == free_.size() || b < free_[best].bytes)) best = i;
    }
    if (best == free_.size()) return;
    *out = std::move(free_[best]);
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    held_ -= out->bytes;
  }

  void give_back(void* data) {
    std::vector<Block> dropped;
    c10::DeleterFnPtr raw = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(data);
      if (it == live_.end()) {
        // A small block that raw_allocate passed through: the replaced allocator's own.
        raw = base_raw_deleter_;
      } else {
        dropped.push_back(std::move(it->second));
        live_.erase(it);
        if (depth_ > 0 && dropped.back().bytes <= kCapBytes) {
          held_ += dropped.back().bytes;
          free_.push_back(std::move(dropped.back()));  // free_ runs from the longest-held block to the newest
          dropped.pop_back();
          size_t oldest = 0;
          while (held_ > kCapBytes) held_ -= free_[oldest++].bytes;
          for (size_t i = 0; i < oldest; ++i) dropped.push_back(std::move(free_[i]));
          free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(oldest));
        }
      }
    }
    if (raw != nullptr) raw(data);
    // dropped's blocks are freed here, outside the lock.
  }

  std::mutex mutex_;
  c10::Allocator* base_ = nullptr;              // the allocator a scope replaced (kept after it ends)
  c10::DeleterFnPtr base_raw_deleter_ = nullptr;  // its raw deleter
  int depth_ = 0;                               // scopes open
  bool installed_ = false;                      // whether the open scopes made this the CPU allocator
  std::unordered_map<void*, Block> live_;       // blocks handed out, by address
  std::vector<Block> free_;                     // held blocks, oldest first
  int64_t held_ = 0;                            // their bytes
};

}  // namespace

void enter() { Cache::instance().enter(); }
void exit() { Cache::instance().exit(); }
int64_t held_bytes() { return Cache::instance().held(); }
void release() { Cache::instance().release(); }

}  // namespace block_cache
}  // namespace twicediff
