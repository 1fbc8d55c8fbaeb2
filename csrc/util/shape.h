// Shapes as they appear in error messages: "[2, 3]".
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace twicediff {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) s += (d ? ", " : "") + std::to_string(sizes[d]);
  return s + "]";
}
inline std::string shape_str(const at::Tensor& t) { return shape_str(t.sizes()); }

}  // namespace twicediff
