// A cache of large CPU blocks for the products of the generic engines (torch.func, autograd,
// compiled), kept while a product runs and between products.
//
// Why: a vmapped forward-over-reverse product on the CPU allocates and frees intermediates of many
// MB, over and over. glibc hands blocks above its mmap threshold (at most 32 MiB) to the kernel on
// free and maps fresh ones on the next malloc, so every call faults in, and has the kernel zero,
// every page of them again (benchmarks/results/allocator_cpu.md). The native ops avoid this with
// their scratch arena (util/scratch.h); the generic engines run torch's own operators, whose
// allocations only the CPU allocator sees.
//
// How: while a scope is open (enter() ... exit(), nested scopes counted), this cache is torch's CPU
// allocator (c10::SetCPUAllocator). Blocks of kMinBytes and more come from the allocator it replaced
// and, when their tensor dies, go back to the cache instead of to it; the next allocation of about
// that size (at most a quarter larger) reuses one, its pages already mapped. Smaller requests go
// straight to the replaced allocator (glibc's heap reuses them already) with its own data pointers.
// A block freed outside a scope goes back to the replaced allocator. The cache holds at most
// kCapBytes, dropping the blocks freed longest ago first; release() empties it.
//
// Not installed when another allocator was set with a higher priority than torch's default (the
// cache then stays empty and the scope changes nothing).
#pragma once
#include <cstdint>

namespace twicediff {
namespace block_cache {

constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller blocks are glibc's heap's to reuse
constexpr int64_t kCapBytes = int64_t(1) << 30;  // the most bytes held, in scopes and between them

// Opens a scope (installs the cache as the CPU allocator when it is the outermost).
void enter();
// Closes one; the outermost puts the replaced allocator back. Cached blocks stay for the next scope.
void exit();
// Bytes of freed blocks held for reuse.
int64_t held_bytes();
// Frees every held block (blocks in use go back to the replaced allocator when their tensors die
// outside a scope, or to the cache inside one).
void release();

}  // namespace block_cache
}  // namespace twicediff
