// How CPU kernels size the tasks of at::parallel_for.
#pragma once
#include <algorithm>
#include <cstdint>

namespace twicediff {

// Rows of `width` elements per task so that a task holds about `grain` elements (at least one row):
// below that, waking another thread costs more than the work it would take over.
inline int64_t row_grain(int64_t width, int64_t grain) {
  return std::max<int64_t>(1, grain / std::max<int64_t>(width, 1));
}

}  // namespace twicediff
