// CPU kernels of mlp_hvp: the elementwise passes of the R-operator (see mlp_hvp_common.h for the
// driver and the layout), as parallel loops over contiguous rows, and the fused pass over a narrow
// output layer; GEMMs go through cpu/gemm.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/gemm.h"
#include "mlp_hvp_common.h"
#include "util/parallel.h"

namespace twicediff {
namespace mlp_hvp {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task below which threads are not woken


// Runs body(n_begin, n_end, acc) over slices of the N rows of an [N, cols] matrix, one slice per
// thread, each with its own zeroed accumulator row acc [cols]; then, when `sums` is given,
// sums[d, o] = sum over slices of acc[d*W + o] (sums [D, W] with any strides). Rows are walked in
// memory order, so a pass over the matrix can also reduce it over N without a second pass.
template <typename scalar_t, typename F>
void for_row_slices(int64_t N, int64_t cols, int64_t W, scalar_t* sums, int64_t ss0, int64_t ss1, const F& body) {
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                 N * cols / std::max<int64_t>(kGrain, 1)));
  std::vector<scalar_t> acc(sums ? slices * cols : 0, scalar_t(0));
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      body(t * N / slices, (t + 1) * N / slices, sums ? acc.data() + t * cols : nullptr);
  });
  if (!sums) return;
  for (int64_t j = 0; j < cols; ++j) {
    scalar_t total = 0;
    for (int64_t t = 0; t < slices; ++t) total += acc[t * cols + j];
    sums[(j / W) * ss0 + (j % W) * ss1] = total;
  }
}

// o = scale H_loss(n) r for one row of C logits: (diag(p) - p p^T) r (cross-entropy), p (1 - p) r
// (BCE with logits) or r (MSE); p = softmax / sigmoid of the row's logits (unused for MSE). o may
// alias r.
template <typename scalar_t>
C10_ALWAYS_INLINE void curvature_row(Loss loss, const scalar_t* p, const scalar_t* r, scalar_t* o, int64_t C,
                                     scalar_t scale) {
  if (loss == kCrossEntropy) {
    scalar_t pr_dot = 0;
    for (int64_t c = 0; c < C; ++c) pr_dot += p[c] * r[c];
    for (int64_t c = 0; c < C; ++c) o[c] = scale * p[c] * (r[c] - pr_dot);
  } else if (loss == kBCEWithLogits) {
    for (int64_t c = 0; c < C; ++c) o[c] = scale * p[c] * (scalar_t(1) - p[c]) * r[c];
  } else {
    for (int64_t c = 0; c < C; ++c) o[c] = scale * r[c];
  }
}

// ---- the fused output layer ----------------------------------------------------------------------
//
// A narrow last layer (C <= kHeadMaxClasses logits, no activation after it) makes its four GEMMs
// narrow too: R(z) += R(h) W^T (n = C), g_z^T R(h) (m = C), R(g_z) W and g_z V (k = C), which run at
// a fraction of the BLAS's speed, each with a pass over an [N, D, I] matrix. The fused pass does
// them, the loss curvature and the bias sums of R(g_z) in one sweep per direction, a tile of rows
// at a time, with W and V_d in L1 (measured in benchmarks/results/influence_cpu_notes.md: a
// 250-row, 64-direction float64 call of a 64-64-10 MLP, 17.0 -> 14.4 ms on one thread). The same
// sweep applies the activation of the layer before, R(h) = f'(a) R(a) on the way in and
// R(g_a) = f'(a) R(g_h) + f''(a) g_h R(a) on the way out, with that layer's bias sums: two
// elementwise passes over [N, D, I] fewer (11% off that call on one thread).
constexpr int64_t kHeadMaxClasses = 32;
constexpr int kLanes = 4;  // doubles per vector: one AVX2 register (two SSE2 ones)

struct HeadArgs {
  int64_t N, D, C, I;
  const double* w;       // W [C, I]
  const double* wt;      // W^T [I, Cv * kLanes], zero-padded columns
  int64_t Cv;            // vectors of lanes per row of wt
  const double* v;       // direction d's V [C, I] at v + d * v_stride
  int64_t v_stride;
  double* ra;            // [N, D, I]: in, R(a) of the layer before (R(h) without activation); out, R(g_a)
  const double* s1;      // f'(a) of the layer before [N, I]; null without activation
  const double* s2gh;    // f''(a) g_h [N, I] (Hessian mode, curved activation); null otherwise
  const double* ga;      // g_z [N, C]; null in Gauss-Newton mode
  const double* prob;    // softmax / sigmoid of z [N, C]; null for MSE
  double* rz;            // [N, D, C]: in, R(z) without its R(h) W^T term; out, R(g_z)
  double* second;        // g_z^T R(h) as [D, C, I], out (Hessian mode); null otherwise
  double* bias;          // R(g_b)[d, c] = sum_n R(g_z)[n, d, c] at bias[d * bs0 + c * bs1]; null without bias
  int64_t bs0, bs1;
  double* hidden_bias;   // the layer before's R(g_b)[d, i] = sum_n R(g_a)[n, d, i] likewise; null without bias
  int64_t hbs0, hbs1;
  Loss loss;
  double scale;
};

// kLanes consecutive doubles as one GCC / Clang vector: one AVX2 register (or AVX-512VL's 256-bit
// ones, 32 of them), two SSE2 ones, whichever target the clone below is built for. Four lanes lose
// nothing on the AVX-512 CPU measured (Zen 4 runs a 512-bit FMA as two 256-bit halves), while
// eight-lane vectors spill on AVX2: with them, an x86-64-v3 build took a 250-row, 64-direction call
// of the influence benchmark's MLP 29 ms on one thread, against 14.7 ms with four.
typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));

// (Through an out-parameter: a vector return value would change the baseline clone's ABI.)
C10_ALWAYS_INLINE void load_lanes(Vec& v, const double* p) { std::memcpy(&v, p, sizeof v); }
C10_ALWAYS_INLINE void store_lanes(double* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }

// Vectors of columns per block in the R(g_a) and second-term loops of head_tile: each column of
// W and V_d (and each vector of R(h)) loaded once per block serves all R rows of the tile, each
// scalar of R(g_z) and g_z once per block serves all its vectors.
constexpr int kBlock = 2;
// Vectors of classes per block in the R(z) loop: R * kClassBlock accumulators, kClassBlock columns
// and one broadcast fill AVX2's 16 registers.
constexpr int kClassBlock = 3;

// rg[t, c] = (W R(h)[t])_c for the R rows of a tile and the classes of vectors cv .. cv+CV-1, as
// R(h)[t]^T W^T: the classes in the lanes, one row of W^T and one scalar of each row's R(h) per
// step, no horizontal sums.
template <int R, int CV>
C10_ALWAYS_INLINE void head_rz_block(const HeadArgs& a, int64_t cv, const double* const* h,
                                     double (*rg)[kHeadMaxClasses]) {
  Vec acc[R][CV] = {};
  const double* wt = a.wt + cv * kLanes;
  const int64_t stride = a.Cv * kLanes;
  for (int64_t i = 0; i < a.I; ++i) {
    Vec w[CV];
    for (int b = 0; b < CV; ++b) load_lanes(w[b], wt + i * stride + b * kLanes);
    for (int t = 0; t < R; ++t) {
      const double x = h[t][i];
      for (int b = 0; b < CV; ++b) acc[t][b] += x * w[b];
    }
  }
  for (int t = 0; t < R; ++t)
    for (int b = 0; b < CV; ++b) store_lanes(rg[t] + (cv + b) * kLanes, acc[t][b]);
}

// R(g_a) over NB vectors of columns from column i of the R rows of a tile (see head_tile).
template <int R, int NB>
C10_ALWAYS_INLINE void head_rga_block(const HeadArgs& a, int64_t i, const double* V, const double (*rg)[kHeadMaxClasses],
                                      const double* const* g, const double* const* s, const double* const* q,
                                      double* const* o, double* hidden_acc) {
  const int64_t C = a.C, I = a.I;
  Vec acc[R][NB] = {};
  for (int64_t c = 0; c < C; ++c) {
    Vec w[NB];
    for (int b = 0; b < NB; ++b) load_lanes(w[b], a.w + c * I + i + b * kLanes);
    for (int t = 0; t < R; ++t) {
      const double r = rg[t][c];
      for (int b = 0; b < NB; ++b) acc[t][b] += r * w[b];
    }
  }
  if (a.ga) {
    for (int64_t c = 0; c < C; ++c) {
      Vec v[NB];
      for (int b = 0; b < NB; ++b) load_lanes(v[b], V + c * I + i + b * kLanes);
      for (int t = 0; t < R; ++t) {
        const double r = g[t][c];
        for (int b = 0; b < NB; ++b) acc[t][b] += r * v[b];
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t j = i + b * kLanes;
    Vec hb;
    load_lanes(hb, hidden_acc + j);
    for (int t = 0; t < R; ++t) {
      Vec out = acc[t][b];
      if (s[t]) {
        Vec f1;
        load_lanes(f1, s[t] + j);
        if (q[t]) {
          Vec f2, x;
          load_lanes(f2, q[t] + j);
          load_lanes(x, o[t] + j);
          out = f1 * out + f2 * x;
        } else {
          out = f1 * out;
        }
      }
      hb += out;
      store_lanes(o[t] + j, out);
    }
    store_lanes(hidden_acc + j, hb);
  }
}

// second[c, i .. i + NB*kLanes) += sum_t g_z[t, c] R(h)[t, i ..] over the R rows of a tile.
template <int R, int NB>
C10_ALWAYS_INLINE void head_second_block(int64_t C, int64_t I, int64_t i, const double* const* h,
                                         const double* const* g, double* sec) {
  Vec x[R][NB];
  for (int t = 0; t < R; ++t)
    for (int b = 0; b < NB; ++b) load_lanes(x[t][b], h[t] + i + b * kLanes);
  for (int64_t c = 0; c < C; ++c) {
    double* sc = sec + c * I + i;
    Vec sum[NB];
    for (int b = 0; b < NB; ++b) load_lanes(sum[b], sc + b * kLanes);
    for (int t = 0; t < R; ++t) {
      const double gc = g[t][c];
      for (int b = 0; b < NB; ++b) sum[b] += gc * x[t][b];
    }
    for (int b = 0; b < NB; ++b) store_lanes(sc + b * kLanes, sum[b]);
  }
}

// Rows n .. n+R-1 of direction d; rh [R, I] is the tile's scratch for R(h) = f'(a) R(a).
template <int R>
C10_ALWAYS_INLINE void head_tile(const HeadArgs& a, int64_t d, int64_t n, const double* V, double* sec,
                                 double* bias_acc, double* hidden_acc, double* rh) {
  const int64_t C = a.C, I = a.I, Ib = I - I % kLanes;
  const double* h[R];
  const double* s[R];
  const double* q[R];
  const double* g[R];
  double* z[R];
  double* o[R];
  for (int t = 0; t < R; ++t) {
    const int64_t row = (n + t) * a.D + d;
    o[t] = a.ra + row * I;
    h[t] = rh + t * I;
    s[t] = a.s1 ? a.s1 + (n + t) * I : nullptr;
    q[t] = a.s2gh ? a.s2gh + (n + t) * I : nullptr;
    z[t] = a.rz + row * C;
    g[t] = a.ga ? a.ga + (n + t) * C : nullptr;
    // R(h) = f'(a) R(a) into the scratch: the R(a) rows are overwritten with R(g_a) below.
    for (int64_t i = 0; i < I; ++i) rh[t * I + i] = s[t] ? s[t][i] * o[t][i] : o[t][i];
  }
  // R(z) = R(z)_partial + W R(h), then R(g_z) = scale H_loss R(z) over it, and the bias sums.
  double rg[R][kHeadMaxClasses];
  for (int64_t cv = 0; cv < a.Cv; cv += kClassBlock) {
    switch (std::min<int64_t>(kClassBlock, a.Cv - cv)) {
      case 1: head_rz_block<R, 1>(a, cv, h, rg); break;
      case 2: head_rz_block<R, 2>(a, cv, h, rg); break;
      default: head_rz_block<R, kClassBlock>(a, cv, h, rg); break;
    }
  }
  for (int t = 0; t < R; ++t)
    for (int64_t c = 0; c < C; ++c) rg[t][c] += z[t][c];
  for (int t = 0; t < R; ++t) {
    curvature_row(a.loss, a.prob ? a.prob + (n + t) * C : nullptr, rg[t], rg[t], C, a.scale);
    for (int64_t c = 0; c < C; ++c) {
      z[t][c] = rg[t][c];
      bias_acc[c] += rg[t][c];
    }
  }
  // R(g_h) = R(g_z) W (+ g_z V), then R(g_a) = f'(a) R(g_h) (+ f''(a) g_h R(a)) over R(a), and the
  // layer before's bias sums; kBlock vectors of columns at a time, then one, then single columns.
  int64_t i = 0;
  for (; i + kBlock * kLanes <= I; i += kBlock * kLanes) head_rga_block<R, kBlock>(a, i, V, rg, g, s, q, o, hidden_acc);
  for (; i < Ib; i += kLanes) head_rga_block<R, 1>(a, i, V, rg, g, s, q, o, hidden_acc);
  for (; i < I; ++i) {
    for (int t = 0; t < R; ++t) {
      double sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += rg[t][c] * a.w[c * I + i] + (a.ga ? g[t][c] * V[c * I + i] : 0.0);
      if (s[t]) sum = s[t][i] * sum + (q[t] ? q[t][i] * o[t][i] : 0.0);
      hidden_acc[i] += sum;
      o[t][i] = sum;
    }
  }
  // second[c, :] += sum_t g_z[n+t, c] R(h)[n+t, d, :], blocked likewise.
  if (sec) {
    i = 0;
    for (; i + kBlock * kLanes <= I; i += kBlock * kLanes) head_second_block<R, kBlock>(C, I, i, h, g, sec);
    for (; i < Ib; i += kLanes) head_second_block<R, 1>(C, I, i, h, g, sec);
    for (; i < I; ++i)
      for (int64_t c = 0; c < C; ++c) {
        double sum = sec[c * I + i];
        for (int t = 0; t < R; ++t) sum += g[t][c] * h[t][i];
        sec[c * I + i] = sum;
      }
  }
}

// Directions d0 .. d1-1, rows in memory order: a tile of rows, then every direction of it.
//
// The build targets baseline x86-64 (SSE2); on x86-64 GCC and Clang compile this pass also for
// x86-64-v3 (AVX2, FMA) and v4 (AVX-512) and pick the best the CPU runs at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void head_directions(const HeadArgs& a, int64_t d0, int64_t d1) {
  constexpr int kTile = 4;
  const int64_t C = a.C, I = a.I, CI = a.C * a.I;
  std::vector<double> bias_acc((d1 - d0) * C, 0.0), hidden_acc((d1 - d0) * I, 0.0), rh(kTile * I);
  if (a.second) std::fill(a.second + d0 * CI, a.second + d1 * CI, 0.0);
  auto sec = [&](int64_t d) { return a.second ? a.second + d * CI : nullptr; };
  int64_t n = 0;
  for (; n + kTile <= a.N; n += kTile)
    for (int64_t d = d0; d < d1; ++d)
      head_tile<kTile>(a, d, n, a.v + d * a.v_stride, sec(d), bias_acc.data() + (d - d0) * C,
                       hidden_acc.data() + (d - d0) * I, rh.data());
  for (; n < a.N; ++n)
    for (int64_t d = d0; d < d1; ++d)
      head_tile<1>(a, d, n, a.v + d * a.v_stride, sec(d), bias_acc.data() + (d - d0) * C,
                   hidden_acc.data() + (d - d0) * I, rh.data());
  for (int64_t d = d0; d < d1; ++d) {
    if (a.bias)
      for (int64_t c = 0; c < C; ++c) a.bias[d * a.bs0 + c * a.bs1] = bias_acc[(d - d0) * C + c];
    if (a.hidden_bias)
      for (int64_t i = 0; i < I; ++i) a.hidden_bias[d * a.hbs0 + i * a.hbs1] = hidden_acc[(d - d0) * I + i];
  }
}

struct CpuKernels {
  // Large blocks from the CPU allocator are faulted in afresh on every call; keep them (util/scratch.h).
  static constexpr bool kCacheScratch = true;
  // MKL's dgemm runs R(g_a)^T h, with R(g_a) [N, D*out] transposed, at about half the speed of
  // h^T R(g_a) (24 against 45 GFLOP/s for [4096, 1000] x [1000, 64] on one AVX-512 core); sgemm
  // runs both alike and the transposing write then costs more than it saves
  // (benchmarks/results/native_hvp_orientation.md).
  static bool weight_grad_input_major(at::ScalarType dtype) { return dtype == at::kDouble; }
  // One part per thread, each part's GEMMs single-threaded: on model (a) of issue 3 (D = 64, 2
  // threads) that is 1.14x faster than one R-pass with the BLAS threaded, and 1.15-1.34x on the
  // influence benchmark's float64 MLP (benchmarks/results/native_hvp_model_a.md). The parts' sizes
  // differ by one direction at most; fewer parts are taken while the largest would exceed the mean
  // by over 25% (D = 3 on 2 threads stays whole: a part of 2 and one of 1 ran 0.8x as fast).
  static int64_t direction_parts(int64_t D) {
    int64_t parts = std::min<int64_t>(at::get_num_threads(), D);
    while (parts > 1 && 4 * ((D + parts - 1) / parts) * parts > 5 * D) --parts;
    return std::max<int64_t>(parts, 1);
  }

  // The output layer's narrow GEMMs, loss curvature and bias sums in one pass (above), in float64:
  // one 250-row, 64-direction call of a 64-64-C MLP took 15% / 12% / 5% less time for C = 10 / 20 /
  // 32 on one thread. Not in float32, whose oneDNN GEMMs were as fast or faster (C = 20: 8.3 against
  // 9.6 ms).
  static constexpr bool kFusedHead = true;
  static bool fuses_head(const Plan& plan, at::ScalarType dtype) {
    const Layer& last = plan.layers.back();
    return dtype == at::kDouble && plan.layers.size() >= 2 && last.chain.count == 0 && last.out >= 1 &&
           last.out <= kHeadMaxClasses;
  }
  static void fused_head(const Plan& plan, const at::Tensor& w, const at::Tensor& vdirs, at::Tensor& ra,
                         const at::Tensor& s1, const at::Tensor& s2gh, const at::Tensor& ga, const at::Tensor& prob,
                         at::Tensor& rz, const at::Tensor& second, const at::Tensor& bias_out,
                         const at::Tensor& hidden_bias_out) {
    const at::Tensor wc = w.contiguous();
    const int64_t D = vdirs.size(0), C = wc.size(0), Cv = (C + kLanes - 1) / kLanes;
    TORCH_INTERNAL_ASSERT(rz.scalar_type() == at::kDouble, "mlp_hvp: the fused output-layer pass is float64 only");
    TORCH_INTERNAL_ASSERT(C >= 1 && C <= kHeadMaxClasses, "mlp_hvp: the fused output-layer pass takes 1 to 32 logits");
    at::Tensor wt = at::zeros({wc.size(1), Cv * kLanes}, wc.options());
    wt.narrow(1, 0, C).copy_(wc.t());
    HeadArgs a;
    a.N = ra.size(0); a.D = D; a.C = C; a.I = wc.size(1);
    a.w = wc.const_data_ptr<double>();
    a.wt = wt.const_data_ptr<double>();
    a.Cv = Cv;
    a.v = vdirs.const_data_ptr<double>();
    a.v_stride = vdirs.stride(0);
    a.ra = ra.mutable_data_ptr<double>();
    a.s1 = s1.defined() ? s1.const_data_ptr<double>() : nullptr;
    a.s2gh = s2gh.defined() ? s2gh.const_data_ptr<double>() : nullptr;
    a.ga = ga.defined() ? ga.const_data_ptr<double>() : nullptr;
    a.prob = prob.defined() ? prob.const_data_ptr<double>() : nullptr;
    a.rz = rz.mutable_data_ptr<double>();
    a.second = second.defined() ? second.mutable_data_ptr<double>() : nullptr;
    a.bias = bias_out.defined() ? bias_out.mutable_data_ptr<double>() : nullptr;
    a.bs0 = bias_out.defined() ? bias_out.stride(0) : 0;
    a.bs1 = bias_out.defined() ? bias_out.stride(1) : 0;
    a.hidden_bias = hidden_bias_out.defined() ? hidden_bias_out.mutable_data_ptr<double>() : nullptr;
    a.hbs0 = hidden_bias_out.defined() ? hidden_bias_out.stride(0) : 0;
    a.hbs1 = hidden_bias_out.defined() ? hidden_bias_out.stride(1) : 0;
    a.loss = plan.loss;
    a.scale = plan.scale;
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) { head_directions(a, d0, d1); });
  }

  static void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
    cpu::gemm(out, a, b, beta);
  }

  static void forward_activation(const at::Tensor& a, const ActivationChain& chain, at::Tensor& h, at::Tensor& s1,
                                 at::Tensor& s2) {
    // A lone Tanh or tanh-approximated GELU takes its tanh from ATen's vectorised kernel and the
    // rest from it by arithmetic: libm's scalar tanh cost about 0.3 ms per [512, 128] layer, a
    // third of a one-direction call on model (a) of issue 3. The formulas are those of
    // activation_derivatives.
    if (chain.count == 1 && (chain.code[0] == kTanh || chain.code[0] == kGELUTanh)) {
      const bool gelu = chain.code[0] == kGELUTanh;
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_tanh", [&] {
        const scalar_t* __restrict__ pa = a.const_data_ptr<scalar_t>();
        scalar_t* __restrict__ ph = h.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p1 = s1.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p2 = s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr;
        const scalar_t one = 1, half = 0.5, k = M_SQRT2 * M_2_SQRTPI * 0.5, c = 0.044715;
        if (!gelu) {
          at::tanh_out(h, a);
        } else {  // h holds tanh(u), u = k (a + c a^3), until the loop below writes the value
          at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) ph[i] = k * (pa[i] + c * pa[i] * pa[i] * pa[i]);
          });
          at::tanh_(h);
        }
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t t = ph[i], sech2 = one - t * t;
            if (!gelu) {
              p1[i] = sech2;
              if (p2) p2[i] = scalar_t(-2) * t * sech2;
              continue;
            }
            const scalar_t x = pa[i], du = k * (one + scalar_t(3) * c * x * x), ddu = k * scalar_t(6) * c * x;
            ph[i] = half * x * (one + t);
            p1[i] = half * (one + t) + half * x * sech2 * du;
            if (p2) p2[i] = sech2 * (du + half * x * (ddu - scalar_t(2) * t * du * du));
          }
        });
      });
      return;
    }
    // A lone Softplus likewise: log1p(exp(z)) = max(z, 0) + log1p(e) with z = beta a and
    // e = exp(-|z|) in (0, 1], exp and log from ATen's vectorised kernels (libm's cost about 0.5 ms
    // per [512, 128] layer; ATen's log1p is not vectorised). log1p(e) = log(u) e / (u - 1) with
    // u = 1 + e rounded keeps full accuracy for tiny e (Goldberg's formula).
    if (chain.count == 1 && chain.code[0] == kSoftplus) {
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_softplus", [&] {
        const scalar_t* __restrict__ pa = a.const_data_ptr<scalar_t>();
        scalar_t* __restrict__ ph = h.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p1 = s1.mutable_data_ptr<scalar_t>();
        scalar_t* __restrict__ p2 = s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr;
        const scalar_t beta = chain.p0[0], threshold = chain.p1[0], one = 1;
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) p1[i] = -std::abs(beta * pa[i]);
        });
        at::exp_(s1);  // s1 = e = exp(-|z|)
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) ph[i] = one + p1[i];
        });
        at::log_(h);   // h = log(u), u = 1 + e
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t z = beta * pa[i], e = p1[i], u = one + e;
            const scalar_t log1p_e = u == one ? e : ph[i] * (e / (u - one));
            if (z > threshold) {
              ph[i] = pa[i];
              p1[i] = one;
              if (p2) p2[i] = 0;
              continue;
            }
            const scalar_t sig = z >= 0 ? one / (one + e) : e / (one + e);
            ph[i] = (std::max(z, scalar_t(0)) + log1p_e) / beta;
            p1[i] = sig;
            if (p2) p2[i] = beta * sig * (one - sig);
          }
        });
      });
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mlp_hvp_forward_activation", [&] {
      const scalar_t* pa = a.const_data_ptr<scalar_t>();
      scalar_t* ph = h.mutable_data_ptr<scalar_t>();
      scalar_t* p1 = s1.mutable_data_ptr<scalar_t>();
      scalar_t* p2 = s2.defined() ? s2.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t y, d1, d2;
          chain_derivatives<scalar_t>(chain, pa[i], y, d1, d2);
          ph[i] = y;
          p1[i] = d1;
          if (p2) p2[i] = d2;
        }
      });
    });
  }

  static void loss_forward(const at::Tensor& z, const at::Tensor& target, const Plan& plan, at::Tensor& prob,
                           at::Tensor& g) {
    const int64_t N = z.size(0), C = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_hvp_loss_forward", [&] {
      const scalar_t* pz = z.const_data_ptr<scalar_t>();
      scalar_t* pp = prob.defined() ? prob.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* pg = g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t scale = static_cast<scalar_t>(plan.scale);
      at::parallel_for(0, N, row_grain(C, kGrain), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* zr = pz + n * C;
          if (plan.loss == kCrossEntropy) {
            scalar_t m = zr[0];
            for (int64_t c = 1; c < C; ++c) m = std::max(m, zr[c]);
            scalar_t sum = 0;
            for (int64_t c = 0; c < C; ++c) sum += (pp[n * C + c] = std::exp(zr[c] - m));
            const scalar_t inv = scalar_t(1) / sum;
            for (int64_t c = 0; c < C; ++c) pp[n * C + c] *= inv;
            if (pg) {
              const int64_t t = target.const_data_ptr<int64_t>()[n];
              for (int64_t c = 0; c < C; ++c) pg[n * C + c] = scale * (pp[n * C + c] - scalar_t(c == t));
            }
          } else {
            const scalar_t* yr = target.const_data_ptr<scalar_t>() + n * C;
            for (int64_t c = 0; c < C; ++c) {
              if (plan.loss == kBCEWithLogits) {
                const scalar_t s = scalar_t(1) / (scalar_t(1) + std::exp(-zr[c]));
                pp[n * C + c] = s;
                if (pg) pg[n * C + c] = scale * (s - yr[c]);
              } else if (pg) {
                pg[n * C + c] = scale * (zr[c] - yr[c]);
              }
            }
          }
        }
      });
    });
  }

  static void loss_curvature(const at::Tensor& rz, const at::Tensor& z, const at::Tensor& prob, const Plan& plan,
                             at::Tensor& rg, int64_t D) {
    const int64_t N = z.size(0), C = z.size(1);
    AT_DISPATCH_FLOATING_TYPES(rz.scalar_type(), "mlp_hvp_loss_curvature", [&] {
      const scalar_t* pr = rz.const_data_ptr<scalar_t>();
      const scalar_t* pp = prob.defined() ? prob.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* po = rg.mutable_data_ptr<scalar_t>();
      const scalar_t scale = static_cast<scalar_t>(plan.scale);
      at::parallel_for(0, N * D, row_grain(C, kGrain), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row)
          curvature_row(plan.loss, pp ? pp + (row / D) * C : nullptr, pr + row * C, po + row * C, C, scale);
      });
    });
  }

  static void backward_activation(const at::Tensor& gh, const at::Tensor& s1, const at::Tensor& s2, at::Tensor& ga,
                                  at::Tensor& s2gh) {
    AT_DISPATCH_FLOATING_TYPES(gh.scalar_type(), "mlp_hvp_backward_activation", [&] {
      const scalar_t* pg = gh.const_data_ptr<scalar_t>();
      const scalar_t* p1 = s1.const_data_ptr<scalar_t>();
      const scalar_t* p2 = s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* pa = ga.mutable_data_ptr<scalar_t>();
      scalar_t* pq = s2gh.defined() ? s2gh.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, gh.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) pa[i] = p1[i] * pg[i];
        if (p2 && pq)
          for (int64_t i = begin; i < end; ++i) pq[i] = p2[i] * pg[i];
      });
    });
  }

  static void rforward_activation(const at::Tensor& ra, const at::Tensor& s1, at::Tensor& rh, int64_t D) {
    const int64_t rows = ra.size(0) * D, W = ra.size(1) / D;
    AT_DISPATCH_FLOATING_TYPES(ra.scalar_type(), "mlp_hvp_rforward_activation", [&] {
      const scalar_t* pa = ra.const_data_ptr<scalar_t>();  // may alias rh (in place)
      scalar_t* ph = rh.mutable_data_ptr<scalar_t>();
      const scalar_t* __restrict__ p1 = s1.const_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(W, kGrain), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* __restrict__ s = p1 + (row / D) * W;
          const scalar_t* a = pa + row * W;
          scalar_t* h = ph + row * W;
          for (int64_t o = 0; o < W; ++o) h[o] = s[o] * a[o];
        }
      });
    });
  }

  // rg = s1 rg + s2gh ra over [N, D*W]; with bias_out, also bias_out[d, o] = sum_n rg[n, d*W + o]
  // in the same pass.
  static void rbackward_activation(at::Tensor& rg, const at::Tensor& s1, const at::Tensor& s2gh, const at::Tensor& ra,
                                   int64_t D, const at::Tensor& bias_out) {
    const int64_t N = rg.size(0), cols = rg.size(1), W = cols / D;
    AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "mlp_hvp_rbackward_activation", [&] {
      scalar_t* pg = rg.mutable_data_ptr<scalar_t>();
      const scalar_t* p1 = s1.const_data_ptr<scalar_t>();
      const scalar_t* pq = s2gh.defined() ? s2gh.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* pa = ra.const_data_ptr<scalar_t>();
      scalar_t* pb = bias_out.defined() ? bias_out.mutable_data_ptr<scalar_t>() : nullptr;
      for_row_slices<scalar_t>(N, cols, W, pb, pb ? bias_out.stride(0) : 0, pb ? bias_out.stride(1) : 0,
                               [&](int64_t n0, int64_t n1, scalar_t* acc) {
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* __restrict__ s = p1 + n * W;
          const scalar_t* __restrict__ q = pq ? pq + n * W : nullptr;
          for (int64_t d = 0; d < D; ++d) {
            scalar_t* __restrict__ g = pg + n * cols + d * W;
            const scalar_t* __restrict__ a = pa + n * cols + d * W;
            if (q) {
              for (int64_t o = 0; o < W; ++o) g[o] = s[o] * g[o] + q[o] * a[o];
            } else {
              for (int64_t o = 0; o < W; ++o) g[o] = s[o] * g[o];
            }
            if (acc) {
              scalar_t* __restrict__ c = acc + d * W;
              for (int64_t o = 0; o < W; ++o) c[o] += g[o];
            }
          }
        }
      });
    });
  }

  static void column_sums(const at::Tensor& m, const at::Tensor& out, int64_t D) {
    const int64_t N = m.size(0), cols = m.size(1), W = cols / D;
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "mlp_hvp_column_sums", [&] {
      const scalar_t* pm = m.const_data_ptr<scalar_t>();
      for_row_slices<scalar_t>(N, cols, W, out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1),
                               [&](int64_t n0, int64_t n1, scalar_t* acc) {
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* __restrict__ r = pm + n * cols;
          for (int64_t j = 0; j < cols; ++j) acc[j] += r[j];
        }
      });
    });
  }
};

at::Tensor mlp_hvp_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                       const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& directions,
                       at::IntArrayRef activation_counts, at::IntArrayRef activation_codes,
                       at::ArrayRef<double> activation_params, int64_t loss, int64_t reduction, bool gauss_newton) {
  const Plan plan = make_plan(x, target, weights, biases, directions, activation_counts, activation_codes,
                              activation_params, loss, reduction, gauss_newton);
  return run<CpuKernels>(plan, x, target, weights, biases, directions);
}

}  // namespace
}  // namespace mlp_hvp

TORCH_LIBRARY_IMPL(twicediff, CPU, m) { m.impl("mlp_hvp", &mlp_hvp::mlp_hvp_cpu); }

}  // namespace twicediff
