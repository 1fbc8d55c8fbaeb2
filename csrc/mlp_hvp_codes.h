// mlp_hvp: the codes of its activations, losses and reductions, and their names.
//
// The enums are the native side of the op's interface; the Python wrapper's tables
// (twicediff._ops.MLP_ACTIVATIONS, MLP_LOSSES, MLP_REDUCTIONS) must give every name the same code.
// codes_json() writes the tables below for the op twicediff::mlp_hvp_codes, and a test compares
// them with the Python ones, so the two sides cannot drift apart unnoticed.
#pragma once
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>

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

struct NamedCode {
  const char* name;
  int64_t code;
};

// The names the Python wrapper takes, one per code.
inline constexpr NamedCode kActivationNames[] = {
    {"relu", kReLU}, {"leaky_relu", kLeakyReLU}, {"tanh", kTanh}, {"sigmoid", kSigmoid},
    {"gelu", kGELU}, {"gelu_tanh", kGELUTanh},   {"silu", kSiLU}, {"softplus", kSoftplus}};
inline constexpr NamedCode kLossNames[] = {
    {"mse", kMSE}, {"cross_entropy", kCrossEntropy}, {"bce_with_logits", kBCEWithLogits}};
inline constexpr NamedCode kReductionNames[] = {{"mean", kMean}, {"sum", kSum}};

// Entry i names code i: every code has exactly one name.
template <size_t N>
constexpr bool one_name_per_code(const NamedCode (&names)[N], int64_t count) {
  if (static_cast<int64_t>(N) != count) return false;
  for (size_t i = 0; i < N; ++i)
    if (names[i].code != static_cast<int64_t>(i)) return false;
  return true;
}
static_assert(one_name_per_code(kActivationNames, kNumActivations), "one name per activation code, in code order");
static_assert(one_name_per_code(kLossNames, kNumLosses), "one name per loss code, in code order");
static_assert(one_name_per_code(kReductionNames, kNumReductions), "one name per reduction code, in code order");

// {"activations": {"relu": 0, ...}, "losses": {...}, "reductions": {...}} (JSON).
inline std::string codes_json() {
  std::string s = "{";
  auto table = [&s](const char* key, const auto& names, bool last) {
    s += std::string("\"") + key + "\": {";
    bool first = true;
    for (const NamedCode& n : names) {
      s += (first ? "\"" : ", \"") + std::string(n.name) + "\": " + std::to_string(n.code);
      first = false;
    }
    s += last ? "}" : "}, ";
  };
  table("activations", kActivationNames, false);
  table("losses", kLossNames, false);
  table("reductions", kReductionNames, true);
  return s + "}";
}

}  // namespace mlp_hvp
}  // namespace twicediff
