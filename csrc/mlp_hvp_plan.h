// mlp_hvp: the argument checks of the op and the plan they produce (the layers' shapes, where each
// layer's parameters sit in a row of directions, its activation chain, the loss and its scale),
// shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "mlp_hvp_activation.h"
#include "mlp_hvp_codes.h"
#include "util/shape.h"

namespace twicediff {
namespace mlp_hvp {

struct Layer {
  int64_t in = 0, out = 0;
  int64_t weight_col = 0;   // first column of W_l (row-major [out, in]) in a row of directions
  int64_t bias_col = -1;    // first column of b_l, -1 without bias
  ActivationChain chain;
  bool curved = false;      // some activation in the chain has sigma'' != 0
};

struct Plan {
  std::vector<Layer> layers;
  int64_t n = 0, d = 0, p = 0, classes = 0;
  Loss loss = kMSE;
  Reduction reduction = kMean;
  bool gauss_newton = false;
  double scale = 1.0;       // 1/N or 1/(N C) for mean, 1 for sum (MSE: times 2)
};

// Checks every argument (clear ValueError / TypeError naming it) and lays out the layers.
inline Plan make_plan(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                      const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& directions,
                      at::IntArrayRef activation_counts, at::IntArrayRef activation_codes,
                      at::ArrayRef<double> activation_params, int64_t loss, int64_t reduction,
                      bool gauss_newton) {
  const char* op = "mlp_hvp";
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights must hold at least one [out, in] matrix, got an empty list");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be a 2-d [N, in] matrix, got shape ", shape_str(x));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  const auto dtype = x.scalar_type();
  const auto device = x.device();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   op, ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  auto same = [&](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), " but x has ",
                     dtype, "; they must match");
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but x is on ", device,
                      "; they must be on the same device");
  };
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == L, op, ": biases must have one entry (a tensor or None) per weight, ",
                    "expected ", L, ", got ", biases.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(activation_counts.size()) == L, op,
                    ": activation_counts must have one entry per weight, expected ", L, ", got ",
                    activation_counts.size());
  TORCH_CHECK_VALUE(activation_params.size() == 2 * activation_codes.size(), op,
                    ": activation_params must hold 2 numbers per activation code, expected ",
                    2 * activation_codes.size(), ", got ", activation_params.size());
  TORCH_CHECK_VALUE(loss >= 0 && loss < kNumLosses, op, ": loss must be 0 (MSE), 1 (cross-entropy) or 2 ",
                    "(BCE with logits), got ", loss);
  TORCH_CHECK_VALUE(reduction == kMean || reduction == kSum, op, ": reduction must be 0 (mean) or 1 (sum), got ",
                    reduction);

  Plan plan;
  plan.loss = static_cast<Loss>(loss);
  plan.reduction = static_cast<Reduction>(reduction);
  plan.gauss_newton = gauss_newton;
  plan.n = x.size(0);
  int64_t col = 0, code_at = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    const std::string wname = "weights[" + std::to_string(l) + "]";
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": ", wname, " must be a 2-d [out, in] matrix, got shape ", shape_str(w));
    same(w, wname);
    Layer lay;
    lay.out = w.size(0);
    lay.in = w.size(1);
    const int64_t expect_in = l == 0 ? x.size(1) : weights[l - 1].size(0);
    TORCH_CHECK_VALUE(lay.in == expect_in, op, ": ", wname, " has shape ", shape_str(w), " so it takes ", lay.in,
                      " inputs, but ", (l == 0 ? std::string("x has ") : "weights[" + std::to_string(l - 1) + "] gives "),
                      expect_in, " features");
    lay.weight_col = col;
    col += lay.out * lay.in;
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) {
      const std::string bname = "biases[" + std::to_string(l) + "]";
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == lay.out, op, ": ", bname, " must have shape [", lay.out,
                        "], got ", shape_str(*b));
      same(*b, bname);
      lay.bias_col = col;
      col += lay.out;
    }
    const int64_t count = activation_counts[l];
    TORCH_CHECK_VALUE(count >= 0 && count <= kMaxChain, op, ": activation_counts[", l, "] must be in [0, ",
                      kMaxChain, "], got ", count);
    TORCH_CHECK_VALUE(code_at + count <= static_cast<int64_t>(activation_codes.size()), op,
                      ": activation_counts sum to more than the ", activation_codes.size(), " activation codes given");
    lay.chain.count = static_cast<int>(count);
    for (int64_t i = 0; i < count; ++i, ++code_at) {
      const int64_t c = activation_codes[code_at];
      TORCH_CHECK_VALUE(c >= 0 && c < kNumActivations, op, ": activation_codes[", code_at, "] must be in [0, ",
                        int64_t(kNumActivations), "), got ", c);
      lay.chain.code[i] = static_cast<int>(c);
      lay.chain.p0[i] = activation_params[2 * code_at];
      lay.chain.p1[i] = activation_params[2 * code_at + 1];
      if (c == kSoftplus)
        TORCH_CHECK_VALUE(lay.chain.p0[i] > 0, op, ": softplus beta (activation_params[", 2 * code_at,
                          "]) must be > 0, got ", lay.chain.p0[i]);
      lay.curved = lay.curved || is_curved(static_cast<int>(c));
    }
    plan.layers.push_back(lay);
  }
  TORCH_CHECK_VALUE(code_at == static_cast<int64_t>(activation_codes.size()), op, ": activation_counts sum to ",
                    code_at, " but ", activation_codes.size(), " activation codes were given");
  plan.p = col;
  plan.classes = plan.layers.back().out;

  TORCH_CHECK_VALUE(directions.dim() == 2 && directions.size(1) == plan.p, op,
                    ": directions must have shape [D, P] with P = ", plan.p,
                    " (the weights and biases, flattened in order), got ", shape_str(directions));
  same(directions, "directions");
  plan.d = directions.size(0);

  const int64_t N = plan.n, C = plan.classes;
  TORCH_CHECK_VALUE(target.device() == device, op, ": target is on ", target.device(), " but x is on ", device);
  if (plan.loss == kCrossEntropy) {
    TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), op,
                     ": cross-entropy needs class-index targets (an integer tensor), got dtype ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op, ": target must have shape [", N,
                      "] (one class index per row of x), got ", shape_str(target));
    if (N > 0 && target.numel() > 0) {
      const int64_t lo = target.min().item<int64_t>(), hi = target.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < C, op, ": target class indices must lie in [0, ", C, "), got values in [",
                        lo, ", ", hi, "]");
    }
  } else {
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == N && target.size(1) == C, op,
                      ": target must have the model output's shape [", N, ", ", C, "], got ", shape_str(target));
    same(target, "target");
  }
  TORCH_CHECK_VALUE(!(plan.reduction == kMean && N == 0), op,
                    ": reduction='mean' over x with zero rows is undefined (0/0)");
  const double count = plan.loss == kCrossEntropy ? double(N) : double(N) * double(C);
  plan.scale = plan.reduction == kMean ? 1.0 / count : 1.0;
  if (plan.loss == kMSE) plan.scale *= 2.0;
  return plan;
}

}  // namespace mlp_hvp
}  // namespace twicediff
