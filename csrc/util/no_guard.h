// The device guard of a device that has none to make current: the CPU's, for the code shared with
// CUDA that takes a Kernels / Device policy's device_guard(device).
#pragma once

namespace twicediff {

struct NoGuard {};

}  // namespace twicediff
