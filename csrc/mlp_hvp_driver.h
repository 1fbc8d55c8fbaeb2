// mlp_hvp: exact batched Hessian-vector (or Gauss-Newton-vector) products of an MLP loss. The
// driver below runs Pearlmutter's R-operator for all D directions at once, shared by the CPU
// (cpu/mlp_hvp.cpp) and CUDA (cuda/mlp_hvp.cu) kernels; the codes are in mlp_hvp_codes.h, the
// activation maths in mlp_hvp_activation.h, the argument checks in mlp_hvp_plan.h.
//
// The driver leaves every GEMM and everything elementwise to a device's `Kernels` policy (its GEMMs:
// ATen's on CUDA; on the CPU oneDNN's for float32, see cpu/gemm.cpp).
//
// Layout. Every R-quantity is stored row-major as [N, D, width]: row n, direction d. With that
// layout each GEMM of a layer covers all D directions:
//   R(a_l)          = h_{l-1} [N, in] x V_l^T [in, D*out]  +  R(h_{l-1}) [N*D, in] x W_l^T
//   R(g_W_l)        = R(g_a_l)^T [D*out, N] x h_{l-1} [N, in]  +  g_a_l^T [out, N] x R(h_{l-1}) [N, D*in]
//   R(g_h_{l-1})    = R(g_a_l) [N*D, out] x W_l  +  g_a_l [N, out] x V_l [out, D*in]
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "mlp_hvp_plan.h"
#include "util/scratch.h"

namespace twicediff {
namespace mlp_hvp {

// `Kernels` provides the elementwise passes for one device (all tensors contiguous):
//   forward_activation(a [N,out], chain, h, s1, s2)   h = f(a), s1 = f'(a), s2 = f''(a) (s2 may be undefined)
//   loss_forward(z [N,C], target, plan, p, g)          p: softmax / sigmoid of z (CE / BCE), g = dL/dz (may be undefined)
//   loss_curvature(rz [N,D,C], z, p, plan, rg, D)       rg[n,d] = H_loss(n) rz[n,d]
//   backward_activation(gh, s1, s2, ga, s2gh)          ga = s1 gh; s2gh = s2 gh (s2gh may be undefined)
//   rforward_activation(ra [N,D,out], s1, rh, D)       rh = s1 ra (rh may be ra itself)
//   rbackward_activation(rg [N,D,out], s1, s2gh or undefined, ra, D, bias_out or undefined)
//                                                       rg = s1 rg + s2gh ra (in place), then
//                                                       bias_out[d, o] = sum_n rg[n, d, o]
//   column_sums(m [N, D*out], out [D, out] (any strides), D)  out[d, o] = sum_n m[n, d*out + o]
//   device_guard(device)                               an object that makes `device` current while it lives
//   gemm(out, a, b, beta)                              out = beta out + a b (out contiguous; beta 0: not read)
//   kCacheScratch                                     keep the scratch buffer between calls (util/scratch.h)
//   weight_grad_input_major(dtype)                     true: take R(g_W) as h^T R(g_a) [in, D*out] and
//                                                       transpose it while writing; false: as
//                                                       R(g_a)^T h [D*out, in] (the BLAS's faster form)
//   direction_parts(D)                                 into how many parts to split the D directions,
//                                                       each part's R-passes run by one thread at once
//   directions_per_pass(D, row_bytes)                  how many of a part's D directions one R-pass takes,
//                                                       row_bytes being one direction's widest R-quantity
//                                                       ([N, widest layer output] bytes); the part runs
//                                                       R-passes in turn
//   caller_settings(), in_worker(settings)             the calling thread's per-thread settings, and an
//                                                       object that applies them in a worker thread
//                                                       while it lives
//                                                       (1: one R-pass over all D, the BLAS threaded)
//   kFusedHead                                         true: the device has fuses_head(plan, dtype), whether it
//                                                       takes the last layer in one pass, and
//   fused_head(plan, W, V [D,C,I], ra [N,D*I], s1, s2gh (each [N,I] or undefined), g_z or undefined,
//              p, rz [N,D*C], second [D,C,I] or undefined, bias_out [D,C] or undefined,
//              hidden_bias_out [D,I] or undefined)
//                                                       that pass, with the activation of the layer
//                                                       before: R(h) = s1 ra; rz (R(z) less its
//                                                       R(h) W^T term) becomes R(g_z); ra becomes
//                                                       R(g_a) = s1 (R(g_z) W (+ g_z V)) + s2gh ra;
//                                                       second = g_z^T R(h); bias_out and
//                                                       hidden_bias_out = sums of R(g_z) and R(g_a)

// What the R-passes of every direction share: the forward pass and, in Hessian mode, the plain
// backward pass of the loss.
struct Forward {
  std::vector<at::Tensor> W;      // weights in the working dtype
  std::vector<at::Tensor> H;      // H[0] = x, H[l+1] = f_l(a_l)
  std::vector<at::Tensor> S1, S2; // f_l'(a_l), f_l''(a_l) (undefined without activation / curvature)
  std::vector<at::Tensor> GA;     // g_a_l = dL/da_l (Hessian mode)
  std::vector<at::Tensor> S2GH;   // f_l''(a_l) g_h_l (Hessian mode, curved layers)
  at::Tensor prob;                // softmax / sigmoid of the output (CE / BCE)
};

template <class Kernels>
Forward forward_pass(const Plan& plan, const at::Tensor& x, const at::Tensor& target, at::TensorList weights_in,
                     const c10::List<std::optional<at::Tensor>>& biases_in, at::ScalarType dtype) {
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  const bool hessian = !plan.gauss_newton;
  Forward f;
  f.W.resize(L);
  f.H.resize(L + 1);
  f.S1.resize(L);
  f.S2.resize(L);
  f.GA.resize(L);
  f.S2GH.resize(L);
  // h_l = f_l(a_l), a_l = h_{l-1} W_l^T + b_l; keep f', f'' at a_l.
  f.H[0] = x;
  for (int64_t l = 0; l < L; ++l) {
    const Layer& lay = plan.layers[l];
    f.W[l] = weights_in[l].to(dtype);
    const std::optional<at::Tensor> b = biases_in.get(l);
    const bool with_bias = b.has_value() && b->defined();
    at::Tensor a = at::empty({plan.n, lay.out}, f.W[l].options());
    if (with_bias) a.copy_(b->to(dtype).expand({plan.n, lay.out}));
    Kernels::gemm(a, f.H[l], f.W[l].t(), with_bias ? 1.0 : 0.0);
    if (lay.chain.count == 0) {
      f.H[l + 1] = a;
      continue;
    }
    f.H[l + 1] = at::empty_like(a);
    f.S1[l] = at::empty_like(a);
    if (hessian && lay.curved) f.S2[l] = at::empty_like(a);
    Kernels::forward_activation(a, lay.chain, f.H[l + 1], f.S1[l], f.S2[l]);
  }
  // Loss: p (softmax / sigmoid of z) for the curvature; g = dL/dz for the Hessian's second-order terms.
  const at::Tensor& z = f.H[L];
  f.prob = plan.loss == kMSE ? at::Tensor() : at::empty_like(z);
  at::Tensor gz = hessian ? at::empty_like(z) : at::Tensor();
  Kernels::loss_forward(z, target, plan, f.prob, gz);
  // Plain backward (Hessian mode): g_a_l = f_l'(a_l) g_h_l and s2gh_l = f_l''(a_l) g_h_l.
  if (hessian) {
    at::Tensor gh = gz;
    for (int64_t l = L - 1; l >= 0; --l) {
      if (f.S1[l].defined()) {
        f.GA[l] = at::empty_like(gh);
        if (f.S2[l].defined()) f.S2GH[l] = at::empty_like(gh);
        Kernels::backward_activation(gh, f.S1[l], f.S2[l], f.GA[l], f.S2GH[l]);
      } else {
        f.GA[l] = gh;
      }
      if (l > 0) {
        gh = at::empty({plan.n, f.W[l].size(1)}, f.W[l].options());
        Kernels::gemm(gh, f.GA[l], f.W[l], 0.0);
      }
    }
  }
  return f;
}

template <class Kernels>
bool fuses_head(const Plan& plan, at::ScalarType dtype) {
  if constexpr (Kernels::kFusedHead) return Kernels::fuses_head(plan, dtype);
  else return false;
}

// The R-forward and R-backward passes of the directions v [D, P] (contiguous rows), written into
// result [D, P] (rows of a contiguous [*, P]); every intermediate comes from `arena`.
template <class Kernels>
void r_passes(const Plan& plan, const Forward& f, const at::Tensor& v, at::Tensor result, scratch::Arena& arena) {
  const auto dtype = v.scalar_type();
  const int64_t N = plan.n, D = v.size(0);
  const int64_t L = static_cast<int64_t>(plan.layers.size());
  const bool hessian = !plan.gauss_newton;
  const bool fused = fuses_head<Kernels>(plan, dtype);  // the last layer's narrow work in one pass
  const auto& W = f.W;
  const auto& H = f.H;
  auto take = [&](at::IntArrayRef shape) { return arena.take(shape, dtype); };
  auto mm = [&](at::IntArrayRef shape, const at::Tensor& a, const at::Tensor& b) {  // a b into scratch
    at::Tensor out = take(shape);
    Kernels::gemm(out, a, b, 0.0);
    return out;
  };
  // The directions of layer l: V_l as [D*out, in] (row-major [D, out, in]) and, for the second-order
  // term of R(g_h_{l-1}), as [out, D*in].
  auto weight_dirs = [&](const Layer& lay) {
    return v.narrow(1, lay.weight_col, lay.out * lay.in).view({D, lay.out, lay.in});
  };

  // Every intermediate of a layer that the next layers do not read (the copies of its directions,
  // its weight-gradient GEMM's outputs) is given back to the arena once consumed (mark/release_to),
  // so the scratch a direction needs is that of its largest layer, not the sum over layers: one
  // direction of a model of P parameters takes about P (its result) plus its largest layer's weight
  // count or two of them (see NativeEngine.bytes_per_direction), beside the [N, D*width] R-quantities.

  // R-forward: R(a_l) = h_{l-1} V_l^T + R(h_{l-1}) W_l^T + Vb_l, R(h_l) = f_l'(a_l) R(a_l). With a
  // bias the first GEMM carries Vb_l too: [h_{l-1}, 1] [N, in+1] x [V_l, Vb_l]^T [in+1, D*out].
  std::vector<at::Tensor> RA(L), RH(L + 1);
  for (int64_t l = 0; l < L; ++l) {
    const Layer& lay = plan.layers[l];
    const int64_t in = lay.in, out = lay.out;
    at::Tensor ra = take({N, D * out});  // kept: taken before the layer's temporaries
    const int64_t top = arena.mark();
    if (lay.bias_col >= 0) {
      at::Tensor vaug = take({D, out, in + 1});
      vaug.narrow(2, 0, in).copy_(weight_dirs(lay));
      vaug.select(2, in).copy_(v.narrow(1, lay.bias_col, out));
      at::Tensor haug = take({N, in + 1});
      haug.narrow(1, 0, in).copy_(H[l]);
      haug.select(1, in).fill_(1);
      Kernels::gemm(ra, haug, vaug.view({D * out, in + 1}).t(), 0.0);
    } else if (D == 1) {  // one direction's V_l is already a contiguous [out, in]
      Kernels::gemm(ra, H[l], weight_dirs(lay).view({out, in}).t(), 0.0);
    } else {
      at::Tensor vl = take({D, out, in});
      vl.copy_(weight_dirs(lay));
      Kernels::gemm(ra, H[l], vl.view({D * out, in}).t(), 0.0);
    }
    arena.release_to(top);
    if (l > 0 && !(fused && l == L - 1))
      Kernels::gemm(ra.view({N * D, out}), RH[l].view({N * D, in}), W[l].t(), 1.0);
    // Fused, the layer before the last takes its activation's R-passes in the last layer's pass.
    if (!f.S1[l].defined() || (fused && l == L - 2)) {
      RA[l] = RH[l + 1] = ra;
      continue;
    }
    // Hessian mode keeps R(a_l) for the f'' term of the R-backward; Gauss-Newton scales in place.
    const bool keep = hessian && f.S2GH[l].defined();
    RA[l] = ra;
    RH[l + 1] = keep ? take({N, D * out}) : ra;
    Kernels::rforward_activation(ra, f.S1[l], RH[l + 1], D);
  }

  // Loss curvature: R(g_z) = H_loss R(z); fused, with the rest of the last layer's narrow work and
  // the activation of the layer before (RA[L - 2] becomes R(g_a_{L-2})).
  at::Tensor rg, head_second;
  if (fused) {
    const Layer& last = plan.layers[L - 1];
    const Layer& before = plan.layers[L - 2];
    rg = RH[L];
    if (hessian) head_second = take({D, last.out, last.in});
    const at::Tensor bias_dst = last.bias_col >= 0 ? result.narrow(1, last.bias_col, last.out) : at::Tensor();
    const at::Tensor hidden_bias_dst =
        before.bias_col >= 0 ? result.narrow(1, before.bias_col, before.out) : at::Tensor();
    if constexpr (Kernels::kFusedHead)
      Kernels::fused_head(plan, W[L - 1], weight_dirs(last), RA[L - 2], f.S1[L - 2], f.S2GH[L - 2],
                          hessian ? f.GA[L - 1] : at::Tensor(), f.prob, rg, head_second, bias_dst, hidden_bias_dst);
  } else {
    rg = take({N, RH[L].size(1)});
    Kernels::loss_curvature(RH[L], H[L], f.prob, plan, rg, D);
  }

  // R-backward, last layer first.
  for (int64_t l = L - 1; l >= 0; --l) {
    const Layer& lay = plan.layers[l];
    const int64_t in = lay.in, out = lay.out;
    const bool head = fused && l == L - 1;  // its bias sums, second term and R(g_h) are done
    // rg becomes R(g_a_l); R(g_b_l)[d] = sum_n R(g_a_l)[n, d] is taken in the same pass (fused: both
    // done in the last layer's pass for the layer before it).
    const at::Tensor bias_dst = lay.bias_col >= 0 ? result.narrow(1, lay.bias_col, out) : at::Tensor();
    if (!(fused && l >= L - 2)) {
      if (f.S1[l].defined()) Kernels::rbackward_activation(rg, f.S1[l], f.S2GH[l], RA[l], D, bias_dst);
      else if (bias_dst.defined()) Kernels::column_sums(rg, bias_dst, D);
    }
    // R(g_W_l)[d] = R(g_a_l)[:, d]^T h_{l-1}  (+ g_a_l^T R(h_{l-1})[:, d] in Hessian mode)
    at::Tensor dst = result.narrow(1, lay.weight_col, out * in).view({D, out, in});
    const bool second_term = hessian && l > 0;
    const bool input_major = Kernels::weight_grad_input_major(dtype);
    int64_t top = arena.mark();
    if (D == 1 && !head) {
      // One direction: its rows of the result are a contiguous [out, in], which the GEMMs write
      // (and the second term adds to) in place.
      const at::Tensor dst1 = dst.view({out, in});
      if (input_major) {
        at::Tensor gw = mm({in, out}, H[l].t(), rg.view({N, out}));
        dst1.copy_(gw.t());
      } else {
        Kernels::gemm(dst1, rg.view({N, out}).t(), H[l], 0.0);
      }
      arena.release_to(top);
      if (second_term) Kernels::gemm(dst1, f.GA[l].t(), RH[l].view({N, in}), 1.0);
    } else {
      at::Tensor gw = input_major ? mm({in, D * out}, H[l].t(), rg.view({N, D * out}))
                                        .view({in, D, out}).permute({1, 2, 0})
                                  : mm({D * out, in}, rg.view({N, D * out}).t(), H[l]).view({D, out, in});
      if (second_term) {
        at::Tensor second = head ? head_second
                                 : mm({out, D * in}, f.GA[l].t(), RH[l].view({N, D * in}))
                                       .view({out, D, in}).permute({1, 0, 2});
        at::add_out(dst, gw, second);
      } else {
        dst.copy_(gw);
      }
    }
    arena.release_to(top);
    if (l == 0) break;
    if (head) {
      rg = RA[L - 2];
      continue;
    }
    // R(g_h_{l-1}) = R(g_a_l) W_l  (+ g_a_l V_l in Hessian mode)
    at::Tensor rgh = mm({N * D, in}, rg.view({N * D, out}), W[l]);
    if (hessian) {
      top = arena.mark();
      if (D == 1) {  // V_l itself is the [out, in] the GEMM takes
        Kernels::gemm(rgh.view({N, in}), f.GA[l], weight_dirs(lay).view({out, in}), 1.0);
      } else {
        at::Tensor vt = take({out, D, in});
        vt.copy_(weight_dirs(lay).permute({1, 0, 2}));
        Kernels::gemm(rgh.view({N, D * in}), f.GA[l], vt.view({out, D * in}), 1.0);
      }
      arena.release_to(top);
    }
    rg = rgh.view({N, D * in});
  }
}

template <class Kernels>
at::Tensor run(const Plan& plan, const at::Tensor& x_in, const at::Tensor& target_in, at::TensorList weights_in,
               const c10::List<std::optional<at::Tensor>>& biases_in, const at::Tensor& directions_in) {
  const auto in_dtype = x_in.scalar_type();
  // float16 / bfloat16: every step runs (and accumulates) in float32; the result is cast back.
  const auto dtype = (in_dtype == at::kHalf || in_dtype == at::kBFloat16) ? at::kFloat : in_dtype;
  const auto opts = x_in.options().dtype(dtype);
  const int64_t N = plan.n, D = plan.d, P = plan.p;

  at::Tensor result = at::empty({D, P}, opts);
  if (D == 0 || P == 0) return result.to(in_dtype);
  if (N == 0) return result.zero_().to(in_dtype);

  const at::Tensor x = x_in.to(dtype).contiguous();
  const at::Tensor v = directions_in.to(dtype).contiguous();
  const at::Tensor target = plan.loss == kCrossEntropy ? target_in.to(at::kLong).contiguous()
                                                       : target_in.to(dtype).contiguous();
  const Forward f = forward_pass<Kernels>(plan, x, target, weights_in, biases_in, dtype);

  // The directions' R-passes are independent: split into parts, each part runs on one thread with
  // its own scratch slot (util/scratch.h) and writes its own rows of the result, its directions
  // taken directions_per_pass at a time, each R-pass's scratch given back before the next.
  int64_t widest = 0;  // of the R-quantities: every layer's output (the input x has none)
  for (const Layer& lay : plan.layers) widest = std::max(widest, lay.out);
  const int64_t row_bytes = N * widest * static_cast<int64_t>(c10::elementSize(dtype));
  auto part = [&](int64_t d0, int64_t d1, scratch::Arena& arena) {
    const int64_t step = std::max<int64_t>(1, Kernels::directions_per_pass(d1 - d0, row_bytes));
    for (int64_t s0 = d0; s0 < d1; s0 += step) {
      const int64_t s1 = std::min(d1, s0 + step);
      const int64_t top = arena.mark();
      r_passes<Kernels>(plan, f, v.narrow(0, s0, s1 - s0), result.narrow(0, s0, s1 - s0), arena);
      arena.release_to(top);
    }
  };
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(Kernels::direction_parts(D), D));
  if (parts == 1) {
    scratch::Arena arena(x_in.device(), Kernels::kCacheScratch);
    part(0, D, arena);
  } else {
    const auto caller = Kernels::caller_settings();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      [[maybe_unused]] const auto settings = Kernels::in_worker(caller);
      for (int64_t t = begin; t < end; ++t) {
        scratch::Arena arena(x_in.device(), Kernels::kCacheScratch, t);
        part(t * D / parts, (t + 1) * D / parts, arena);
      }
    });
  }
  return in_dtype == dtype ? result : result.to(in_dtype);
}

// The op: the checks first, then the device's guard (Kernels::device_guard), then the passes. The
// checks come first because with x on the CPU and another argument on a GPU the dispatcher still
// comes to the GPU's kernel, and a guard would fail on x's device with a message naming no argument.
template <class Kernels>
at::Tensor mlp_hvp_op(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                      const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& directions,
                      at::IntArrayRef activation_counts, at::IntArrayRef activation_codes,
                      at::ArrayRef<double> activation_params, int64_t loss, int64_t reduction, bool gauss_newton) {
  const Plan plan = make_plan(x, target, weights, biases, directions, activation_counts, activation_codes,
                              activation_params, loss, reduction, gauss_newton);
  [[maybe_unused]] const auto guard = Kernels::device_guard(x.device());
  return run<Kernels>(plan, x, target, weights, biases, directions);
}

}  // namespace mlp_hvp
}  // namespace twicediff
