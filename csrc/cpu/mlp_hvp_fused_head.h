// mlp_hvp on the CPU: the fused pass over a narrow float64 output layer (cpu/mlp_hvp_fused_head.cpp),
// which CpuKernels (cpu/mlp_hvp.cpp) offers the driver as its fuses_head / fused_head.
#pragma once
#include <ATen/ATen.h>

#include "mlp_hvp_plan.h"

namespace twicediff {
namespace mlp_hvp {
namespace cpu {

// Whether the pass takes the last layer of `plan` in `dtype`: float64, at least two layers, at most
// 32 logits and no activation after the last layer.
bool fuses_head(const Plan& plan, at::ScalarType dtype);

// The pass, with the activation of the layer before: see Kernels::fused_head in mlp_hvp_driver.h for
// what each argument holds before and after.
void fused_head(const Plan& plan, const at::Tensor& w, const at::Tensor& vdirs, at::Tensor& ra, const at::Tensor& s1,
                const at::Tensor& s2gh, const at::Tensor& ga, const at::Tensor& prob, at::Tensor& rz,
                const at::Tensor& second, const at::Tensor& bias_out, const at::Tensor& hidden_bias_out);

}  // namespace cpu
}  // namespace mlp_hvp
}  // namespace twicediff
