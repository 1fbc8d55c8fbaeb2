// mlp_hvp on the CPU: the fused pass over a narrow float64 output layer, hand-vectorised with GCC /
// Clang vector types and compiled for several x86-64 levels (see head_directions). In a translation
// unit of its own so that those compiler settings and this code stay apart from the other kernels.
#include "cpu/mlp_hvp_fused_head.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/mlp_hvp_loss.h"

namespace twicediff {
namespace mlp_hvp {
namespace cpu {
namespace {

// A narrow last layer (C <= kHeadMaxClasses logits, no activation after it) makes its four GEMMs
// narrow too: R(z) += R(h) W^T (n = C), g_z^T R(h) (m = C), R(g_z) W and g_z V (k = C), which run at
// a fraction of the BLAS's speed, each with a pass over an [N, D, I] matrix. The fused pass does
// them, the loss curvature and the bias sums of R(g_z) in one sweep per direction, a tile of rows
// at a time, with W and V_d in L1. The same sweep applies the activation of the layer before,
// R(h) = f'(a) R(a) on the way in and R(g_a) = f'(a) R(g_h) + f''(a) g_h R(a) on the way out, with
// that layer's bias sums: two elementwise passes over [N, D, I] fewer.
//
// Only float64 takes it: float32's oneDNN GEMMs are as fast as the pass or faster. NOTE: the gains
// of the pass and of its two parts, and the float32 comparison, are measured in
// docs/notes/influence_cpu.md ("A fused output-layer pass").
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
// ones, 32 of them), two SSE2 ones, whichever target the clone below is built for. Four lanes, not
// eight: eight-lane vectors spill registers in the AVX2 clone, which then runs about half as fast,
// and gain nothing on CPUs that execute a 512-bit FMA as two 256-bit halves. NOTE: measured in
// docs/notes/influence_cpu.md.
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

}  // namespace

bool fuses_head(const Plan& plan, at::ScalarType dtype) {
  const Layer& last = plan.layers.back();
  return dtype == at::kDouble && plan.layers.size() >= 2 && last.chain.count == 0 && last.out >= 1 &&
         last.out <= kHeadMaxClasses;
}

void fused_head(const Plan& plan, const at::Tensor& w, const at::Tensor& vdirs, at::Tensor& ra, const at::Tensor& s1,
                const at::Tensor& s2gh, const at::Tensor& ga, const at::Tensor& prob, at::Tensor& rz,
                const at::Tensor& second, const at::Tensor& bias_out, const at::Tensor& hidden_bias_out) {
  const at::Tensor wc = w.contiguous();
  const int64_t D = vdirs.size(0), C = wc.size(0), Cv = (C + kLanes - 1) / kLanes;
  TORCH_INTERNAL_ASSERT(rz.scalar_type() == at::kDouble, "mlp_hvp: the fused output-layer pass is float64 only");
  TORCH_INTERNAL_ASSERT(C >= 1 && C <= kHeadMaxClasses, "mlp_hvp: the fused output-layer pass takes 1 to ",
                        kHeadMaxClasses, " logits");
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

}  // namespace cpu
}  // namespace mlp_hvp
}  // namespace twicediff
