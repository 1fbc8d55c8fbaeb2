// The LayerNorm tangent ops, shared by csrc/cpu/layer_norm.cpp and csrc/cuda/layer_norm.cu: argument
// checks, the number of directions, and the per-row statistics of the primal backward.
//
// Shapes: R rows of d features. xhat [R, d] (the normalized input, (x - mean) * rstd), rstd [R],
// weight [d] or none, grad_out [R, d]; tangents carry a leading direction dimension B: x_t, grad_out_t
// [B, R, d], weight_t, bias_t [B, d]. What the ops compute is written out in python/twicediff/ops/
// reference.py (layer_norm_tangent, layer_norm_backward_tangent); the derivation is in
// python/twicediff/ops/layer_norm.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace twicediff {
namespace layer_norm {

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Checks every tensor against xhat [R, d] (dtype, device, shape) and returns B, the number of
// directions, read from the first tangent given; at least one tangent must be given.
inline int64_t check(const char* op, const at::Tensor& xhat, const at::Tensor& rstd,
                     const std::optional<at::Tensor>& weight,
                     const std::vector<std::pair<const char*, const std::optional<at::Tensor>*>>& rows_t,
                     const std::vector<std::pair<const char*, const std::optional<at::Tensor>*>>& features_t,
                     const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(xhat.dim() == 2, op, ": xhat must be [rows, features], got ", xhat.sizes());
  TORCH_CHECK(xhat.scalar_type() == at::kFloat || xhat.scalar_type() == at::kDouble, op,
              ": xhat must be float32 or float64, got ", xhat.scalar_type());
  const int64_t R = xhat.size(0), d = xhat.size(1);
  auto same = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    TORCH_CHECK(t.scalar_type() == xhat.scalar_type(), op, ": ", name, " must have xhat's dtype ",
                xhat.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == xhat.device(), op, ": ", name, " must be on xhat's device ", xhat.device(),
                ", got ", t.device());
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  };
  same("rstd", rstd, {R});
  if (given(weight)) same("weight", *weight, {d});
  if (grad_out) same("grad_out", *grad_out, {R, d});
  int64_t B = -1;
  for (const auto& [name, t] : rows_t)
    if (given(*t)) {
      TORCH_CHECK(t->value().dim() == 3, op, ": ", name, " must be [directions, rows, features], got ", t->value().sizes());
      if (B < 0) B = t->value().size(0);
      same(name, t->value(), {B, R, d});
    }
  for (const auto& [name, t] : features_t)
    if (given(*t)) {
      TORCH_CHECK(t->value().dim() == 2, op, ": ", name, " must be [directions, features], got ", t->value().sizes());
      if (B < 0) B = t->value().size(0);
      same(name, t->value(), {B, d});
    }
  TORCH_CHECK(B >= 0, op, ": at least one tangent must be given");
  return B;
}

// [R, 2] per row of the primal backward: mean(g) and mean(g * xhat), g = grad_out * weight.
inline at::Tensor backward_row_stats(const at::Tensor& g, const at::Tensor& xhat) {
  return at::stack({g.mean(-1), (g * xhat).mean(-1)}, -1).contiguous();
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return given(t) ? t->contiguous() : at::Tensor();
}

// The kernels' pointer to an optional tensor's data: null where it is undefined (None).
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// layer_norm_tangent's arguments, checked and contiguous (undefined where None), and its output.
struct TangentCall {
  at::Tensor x_t, xhat, rstd, weight, weight_t, bias_t, out;
  int64_t B, R, d;
};

inline TangentCall tangent_call(const std::optional<at::Tensor>& x_t, const at::Tensor& xhat,
                                const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& weight_t, const std::optional<at::Tensor>& bias_t) {
  const int64_t B = check("layer_norm_tangent", xhat, rstd, weight, {{"x_t", &x_t}},
                          {{"weight_t", &weight_t}, {"bias_t", &bias_t}});
  TangentCall c{contiguous_or_undefined(x_t), xhat.contiguous(), rstd.contiguous(), contiguous_or_undefined(weight),
                contiguous_or_undefined(weight_t), contiguous_or_undefined(bias_t), at::Tensor(), B, xhat.size(0),
                xhat.size(1)};
  c.out = at::empty({B, c.R, c.d}, xhat.options());
  return c;
}

// layer_norm_backward_tangent's arguments, checked and contiguous (undefined where None), its outputs
// (the weight and bias tangents zeroed), and, where there is work, the primal's g = grad_out * weight
// and row statistics (backward_row_stats).
struct BackwardTangentCall {
  at::Tensor grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t;
  at::Tensor grad_x_t, grad_weight_t, grad_bias_t, g, stats;
  int64_t B, R, d;
  bool empty() const { return B == 0 || R == 0 || d == 0; }
};

inline BackwardTangentCall backward_tangent_call(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_out_t,
                                                 const std::optional<at::Tensor>& x_t, const at::Tensor& xhat,
                                                 const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& weight_t) {
  const int64_t B = check("layer_norm_backward_tangent", xhat, rstd, weight, {{"grad_out_t", &grad_out_t}, {"x_t", &x_t}},
                          {{"weight_t", &weight_t}}, &grad_out);
  BackwardTangentCall c{grad_out.contiguous(), contiguous_or_undefined(grad_out_t), contiguous_or_undefined(x_t),
                        xhat.contiguous(), rstd.contiguous(), contiguous_or_undefined(weight),
                        contiguous_or_undefined(weight_t), {}, {}, {}, {}, {}, B, xhat.size(0), xhat.size(1)};
  c.grad_x_t = at::empty({B, c.R, c.d}, xhat.options());
  c.grad_weight_t = at::zeros({B, c.d}, xhat.options());
  c.grad_bias_t = at::zeros({B, c.d}, xhat.options());
  if (!c.empty()) {
    c.g = (c.weight.defined() ? c.grad_out * c.weight : c.grad_out).contiguous();
    c.stats = backward_row_stats(c.g, c.xhat);
  }
  return c;
}

}  // namespace layer_norm
}  // namespace twicediff
