// mlp_hvp: the codes of its activations, losses and reductions. The enums are the native side of
// the op's interface; the Python wrapper's tables (twicediff._ops.MLP_ACTIVATIONS, MLP_LOSSES,
// MLP_REDUCTIONS) must give every name the same code.
#pragma once
#include <cstdint>

namespace twicediff {
namespace mlp_hvp {

enum Activation : int64_t {
  kReLU = 0,        // max(a, 0)
  kLeakyReLU = 1,   // a > 0 ? a : p0 * a             (p0 = negative_slope)
  kTanh = 2,
  kSigmoid = 3,
  kGELU = 4,        // a * Phi(a)
  kGELUTanh = 5,    // 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))
  kSiLU = 6,        // a * sigmoid(a)
  kSoftplus = 7,    // beta * a > threshold ? a : log1p(exp(beta a)) / beta   (p0 = beta, p1 = threshold)
  kNumActivations = 8
};
enum Loss : int64_t { kMSE = 0, kCrossEntropy = 1, kBCEWithLogits = 2, kNumLosses = 3 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNumReductions = 2 };

}  // namespace mlp_hvp
}  // namespace twicediff
