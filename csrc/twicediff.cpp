// twicediff._C: every native op's schema, in one TORCH_LIBRARY block, and the Python module.
//
// The kernels live in cpu/<op>.cpp (TORCH_LIBRARY_IMPL(twicediff, CPU, m)) and cuda/<op>.cu
// (TORCH_LIBRARY_IMPL(twicediff, CUDA, m)); a CPU-only build leaves the .cu files out and the
// dispatcher routes. Python wrappers, fake (meta) kernels and batching rules are in
// python/twicediff/ops/<op>.py; a pure-torch reference of every op is in python/twicediff/ops/reference.py.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "cpu/block_cache.h"
#include "cpu/matmul_route.h"
#include "cpu/gemm.h"
#include "mlp_hvp_codes.h"
#include "util/scratch.h"

TORCH_LIBRARY(twicediff, m) {
  // ---- parameter-space ops (csrc/{cpu,cuda}/pack.*, blockwise.*) ----------------------------
  // out[row_offset : row_offset + B, col_k : col_k + n_k] = blocks[k].reshape(B, n_k), where
  // blocks[k] is [B, *shape_k], n_k = numel(shape_k), col_k = sum_{j<k} n_j and out is [N, P].
  m.def("pack_into(Tensor[] blocks, Tensor(a!) out, int row_offset) -> ()");
  // The inverse: outs[k].reshape(B, n_k) = rows[:, col_k : col_k + n_k], rows [B, P].
  m.def("unpack_into(Tensor rows, Tensor(a!)[] outs) -> ()");
  // The functional pack: a fresh [B, P] matrix, row b = cat_k(blocks[k][b].flatten()).
  m.def("pack(Tensor[] blocks) -> Tensor");
  // C[T, V] = sum_k a[k].reshape(T, n_k) @ b[k].reshape(V, n_k)^T, a[k] [T, *shape_k], b[k] [V, *shape_k].
  m.def("blockwise_contract(Tensor[] a, Tensor[] b) -> Tensor");
  // z[D] = sum_k <v[k][d], g[k]>, v[k] [D, *shape_k], g[k] [*shape_k].
  m.def("blockwise_dot(Tensor[] v, Tensor[] g) -> Tensor");

  // ---- HVP engine ops (csrc/{cpu,cuda}/mlp_hvp.*) --------------------------------------------
  // out [D, P] = H v_d (or the Gauss-Newton J^T H_loss J v_d) for each row v_d of directions [D, P],
  // H the Hessian of loss(f(x), target) in the MLP's flat parameters (W_0, b_0, W_1, b_1, ...; W_l
  // [out, in] row-major, b_l absent where biases[l] is None). f: a_l = h_{l-1} W_l^T + b_l, h_l =
  // act chain l (activation_counts[l] codes, 2 params each) of a_l, h_{-1} = x [N, in]; z = h_last.
  // loss: 0 MSE (target [N, C]), 1 cross-entropy (class indices [N]), 2 BCE with logits ([N, C]);
  // reduction: 0 mean, 1 sum. Not differentiable. Codes: csrc/mlp_hvp_codes.h.
  m.def("mlp_hvp(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, Tensor directions, "
        "int[] activation_counts, int[] activation_codes, float[] activation_params, int loss, int reduction, "
        "bool gauss_newton) -> Tensor");
  // mlp_hvp's codes by name, as JSON: {"activations": {"relu": 0, ...}, "losses": {...},
  // "reductions": {...}}, for the test that holds the Python tables to them. It takes no tensor, so
  // one kernel serves every device (CompositeImplicitAutograd).
  m.def("mlp_hvp_codes() -> str", &twicediff::mlp_hvp::codes_json);

  // ---- GEMM (csrc/{cpu,cuda}/gemm.*) ---------------------------------------------------------------
  // out = beta * out + alpha * a @ b, in place, for a [M, K], b [K, N], out [M, N] (beta = 0: out is
  // not read). The CPU takes float32 through torch's oneDNN where it can (cpu/gemm.cpp), the rest
  // through ATen. Not differentiable.
  m.def("gemm_(Tensor(a!) out, Tensor a, Tensor b, float beta, float alpha) -> ()");

  // ---- K-FAC ops (csrc/{cpu,cuda}/kfac.*, csrc/kfac_common.h) ----------------------------------
  // out [D, D] += sum_r w_r a_r a_r^T for x [R, d], a_r = [x_r, 1] when bias (the 1 implied, never
  // stored), D = d + bias; weights [R] (floating or bool) or None for all ones. x float16, bfloat16,
  // float32 or float64; out float32 or float64 (the accumulation dtype). Not differentiable.
  m.def("kfac_covariance_(Tensor(a!) out, Tensor x, Tensor? weights, bool bias) -> ()");
  // EK-FAC eigenvalue correction: out [O, I'] += sum_n (q_s^T G_n q_a)^2 (elementwise square), with
  // G_n = sum_t w_nt g_nt a_nt^T for g [N, T, O], a [N, T, I] (a_nt with an implied trailing 1 when
  // bias), q_s [O, O], q_a [I', I'], I' = I + bias, weights [N, T] or None. At most `chunk` samples'
  // [O, I'] matrices exist at once (0: a bounded automatic chunk). Not differentiable.
  m.def("kfac_eigen_correction_(Tensor(a!) out, Tensor g, Tensor a, Tensor q_s, Tensor q_a, Tensor? weights, "
        "bool bias, int chunk=0) -> ()");

  // ---- LayerNorm tangent ops (csrc/{cpu,cuda}/layer_norm.*, csrc/layer_norm_common.h) -------------
  // The forward-mode rules of layer_norm over the last dimension, batched over B directions, for the
  // eager forward-over-reverse products (python/twicediff/torch/layer_norm.py). Rows: xhat [R, d] =
  // (x - mean) * rstd, rstd [R], weight [d] or None; tangents x_t [B, R, d], weight_t, bias_t [B, d],
  // each None for zero (at least one given). float32 or float64. Not differentiable.
  // out [B, R, d]: the tangent of xhat * weight + bias.
  m.def("layer_norm_tangent(Tensor? x_t, Tensor xhat, Tensor rstd, Tensor? weight, Tensor? weight_t, "
        "Tensor? bias_t) -> Tensor");
  // The tangents (grad_x_t [B, R, d], grad_weight_t [B, d], grad_bias_t [B, d]) of layer_norm's
  // backward (grad_x, grad_weight, grad_bias) at grad_out [R, d], for grad_out_t [B, R, d], x_t,
  // weight_t (None for zero; at least one given).
  m.def("layer_norm_backward_tangent(Tensor grad_out, Tensor? grad_out_t, Tensor? x_t, Tensor xhat, Tensor rstd, "
        "Tensor? weight, Tensor? weight_t) -> (Tensor, Tensor, Tensor)");

  // ---- solver ops (csrc/{cpu,cuda}/solver_step.*) --------------------------------------------
  // Blocks are [D, P], one row per right-hand side; alpha, beta are float64 [D]; norms are float64.
  // CG update: x += alpha[:, None] * p; r -= alpha[:, None] * Ap; returns ||r[d]||^2 per row.
  m.def("cg_step(Tensor(a!) x, Tensor(b!) r, Tensor p, Tensor Ap, Tensor alpha) -> Tensor");
  // CG direction: p = z + beta[:, None] * p.
  m.def("cg_direction(Tensor(a!) p, Tensor z, Tensor beta) -> ()");
  // LiSSA: h' = b + (1 - dampen) h - (Hh + hessian_perturbation h) / scale, written into h; returns
  // per row max_j |h'-h|/|h'| and sum_j |h'-h|/|h'| (0/0 taken as 0), both NaN where h' is not finite.
  m.def("lissa_step(Tensor(a!) h, Tensor b, Tensor Hh, float dampen, float scale, float hessian_perturbation) -> (Tensor, Tensor)");
}

// The module carries the registrations above (loaded for its side effects), a few facts about how
// it was compiled, the CPU scratch cache of the native ops (csrc/util/scratch.h), the CPU block
// cache of the generic engines' products (csrc/cpu/block_cache.h) and the routing of their float32
// matmuls (csrc/cpu/matmul_route.h).
PYBIND11_MODULE(_C, mod) {
  mod.doc() = "twicediff native ops; use them through torch.ops.twicediff or twicediff._ops";
  mod.def("scratch_bytes", &twicediff::scratch::cached_bytes,
          "Bytes of CPU scratch the native ops keep between calls (0 when none).");
  mod.def("release_scratch", &twicediff::scratch::release,
          "Free the CPU scratch the native ops keep between calls.");
  mod.def("block_cache_enter", &twicediff::block_cache::enter,
          "Open a scope in which large CPU blocks are cached for reuse (nested scopes counted).");
  mod.def("block_cache_exit", &twicediff::block_cache::exit, "Close a scope of block_cache_enter.");
  mod.def("block_cache_bytes", &twicediff::block_cache::held_bytes,
          "Bytes of freed CPU blocks the block cache holds for reuse.");
  mod.def("block_cache_release", &twicediff::block_cache::release, "Free the blocks the block cache holds.");
  mod.attr("block_cache_cap_bytes") = twicediff::block_cache::kCapBytes;
  mod.def("cpu_gemm", &twicediff::cpu::gemm_backend,
          "Which library takes the native ops' float32 GEMMs on the CPU now: 'onednn' or 'blas'.");
  mod.def("set_blas_in_thread", &twicediff::cpu::set_blas_in_thread,
          "Send this thread's float32 GEMMs of the native ops to ATen's BLAS (True) or not; returns the "
          "previous setting.");
  mod.def("matmul_route_enter", &twicediff::cpu::matmul_route::enter,
          "Route this thread's float32 aten mm/addmm/bmm on the CPU to the faster of oneDNN and ATen's BLAS "
          "(nested scopes counted; timed=False: to oneDNN without timing); False, and nothing opened, when "
          "oneDNN may not take them.", pybind11::arg("timed"));
  mod.def("matmul_route_exit", &twicediff::cpu::matmul_route::exit, "Close a scope of matmul_route_enter.");
  mod.def("matmul_route_classes", &twicediff::cpu::matmul_route::classes, "Shape classes decided so far.");
  mod.def("matmul_route_onednn_classes", &twicediff::cpu::matmul_route::onednn_classes,
          "Shape classes decided for oneDNN so far.");
  mod.def("matmul_route_seconds", &twicediff::cpu::matmul_route::deciding_seconds,
          "Seconds spent timing shape classes so far.");
  mod.def("matmul_route_thread_seconds", &twicediff::cpu::matmul_route::thread_deciding_seconds,
          "Seconds this thread spent timing shape classes so far.");
  mod.def("matmul_route_forget", &twicediff::cpu::matmul_route::forget, "Forget every routing decision.");
  mod.def("cpu_gemm_refusal", &twicediff::cpu::gemm_refusal,
          "oneDNN's message when it refused a float32 GEMM of this process ('' when it never did).");
#ifdef TWICEDIFF_WITH_CUDA
  mod.attr("cuda_kernels") = true;
#else
  mod.attr("cuda_kernels") = false;
#endif
}
