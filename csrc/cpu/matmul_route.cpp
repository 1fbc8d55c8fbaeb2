// Routing of torch's float32 CPU matmuls inside the generic engines' products: see matmul_route.h.
#include "cpu/matmul_route.h"

#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "cpu/gemm.h"

namespace twicediff {
namespace cpu {
namespace matmul_route {
namespace {

thread_local int t_depth = 0;        // open scopes on this thread
thread_local uint64_t t_untimed = 0;  // bit k: scope k (0 the outermost) sends everything to oneDNN
thread_local double t_deciding = 0.0;  // seconds this thread spent timing classes

enum Op : int64_t { kMm = 1, kAddmm = 2, kBmm = 3, kMmOut = 4, kAddmmOut = 5, kBmmOut = 6 };

// A shape class: the operator, alpha and beta, and each operand's sizes and strides.
using Key = std::array<int64_t, 24>;

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

class KeyBuilder {
 public:
  explicit KeyBuilder(Op op) { key_[0] = op; }
  KeyBuilder& scalar(double x) {
    TORCH_INTERNAL_ASSERT(at_ < static_cast<int64_t>(key_.size()), "matmul_route: key too long");
    int64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    key_[at_++] = bits;
    return *this;
  }
  KeyBuilder& tensor(const at::Tensor& t) {
    // The callers check the operands' dims first: at most 2 scalars and 4 tensors of 2, or 3 of 3.
    TORCH_INTERNAL_ASSERT(at_ + 1 + 2 * t.dim() <= static_cast<int64_t>(key_.size()), "matmul_route: key too long");
    key_[at_++] = t.dim();
    for (int64_t d = 0; d < t.dim(); ++d) {
      key_[at_++] = t.size(d);
      key_[at_++] = t.stride(d);
    }
    return *this;
  }
  const Key& key() const { return key_; }

 private:
  Key key_{};
  int at_ = 1;
};

std::mutex mutex;
std::unordered_map<Key, bool, KeyHash> chosen;  // true: oneDNN
double seconds_deciding = 0.0;

double seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Runs a oneDNN call; true when oneDNN refused it (its argument checks run before it writes), which
// keeps every later GEMM of the process on ATen. Running out of memory is not a refusal.
template <class Call>
bool refused_by_onednn(Call call) {
  try {
    call();
    return false;
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error& e) {
    refuse_onednn(e);
    return true;
  }
}

// oneDNN's result, or ATen's where oneDNN refuses the call.
template <class Aten, class Ours>
at::Tensor onednn_else_aten(Aten aten, Ours ours) {
  at::Tensor out;
  if (refused_by_onednn([&] { out = ours(); })) return aten();
  return out;
}

// ATen's result, or oneDNN's where this shape class is (or is now found to be) faster there.
// writes_out: both calls write the caller's out= tensor, so the timing's last write is oneDNN's and
// the winner runs once more.
template <class Aten, class Ours>
at::Tensor route(const Key& key, Aten aten, Ours ours, bool writes_out = false) {
  if (t_untimed >> (t_depth - 1) & 1) return onednn_else_aten(aten, ours);
  bool known = false, to_onednn = false, full = false;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = chosen.find(key);
    known = it != chosen.end();
    if (known) to_onednn = it->second;
    full = seconds_deciding >= kDecideBudgetSeconds || static_cast<int64_t>(chosen.size()) >= kMaxClasses;
  }
  if (known || full) return to_onednn ? onednn_else_aten(aten, ours) : aten();
  // New class: one untimed oneDNN call (it creates and caches its kernel for the shape), then the
  // best of up to three alternations of each; a single one when the GEMM is long, where the choice
  // matters less than the time it would take. The winner's result is returned, so that every call
  // of a class gives the same library's result, the first one too.
  const auto start = std::chrono::steady_clock::now();
  at::Tensor by_aten, by_onednn;
  bool onednn = !refused_by_onednn([&] { by_onednn = ours(); });
  double t_aten = 1e300, t_ours = 1e300;
  for (int i = 0; i < 3 && onednn; ++i) {
    auto s = std::chrono::steady_clock::now();
    by_aten = aten();
    t_aten = std::min(t_aten, seconds(s));
    s = std::chrono::steady_clock::now();
    onednn = !refused_by_onednn([&] { by_onednn = ours(); });
    t_ours = std::min(t_ours, seconds(s));
    if (t_aten > 0.02) break;
  }
  onednn = onednn && t_ours < t_aten;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const double spent = seconds(start);
    seconds_deciding += spent;
    t_deciding += spent;
    onednn = chosen.emplace(key, onednn).first->second;  // another thread's decision, if it came first
  }
  if (writes_out) {
    if (onednn && by_onednn.defined() && !refused_by_onednn([&] { ours(); })) return by_onednn;
    return aten();
  }
  if (onednn && by_onednn.defined()) return by_onednn;
  return by_aten.defined() ? by_aten : aten();
}

// oneDNN's matmul when this call is routed: inside a scope, float32 non-empty tensors, and oneDNN
// still allowed (read once per call: another thread's refusal or TWICEDIFF_CPU_GEMM=blas set since
// the scope opened send the call to ATen). nullptr otherwise.
OneDnnMatmul routed(std::initializer_list<const at::Tensor*> ts) {
  if (t_depth == 0) return nullptr;
  for (const at::Tensor* t : ts) {
    if (t->scalar_type() != at::kFloat || t->numel() == 0) return nullptr;
  }
  return onednn_matmul();
}

// The arguments the routed kernels take; anything else goes to ATen, which checks and reports it.
bool mm_args(const at::Tensor& a, const at::Tensor& b) {
  return a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0);
}

bool bmm_args(const at::Tensor& a, const at::Tensor& b) {
  return a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1);
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const OneDnnMatmul fn = routed({&a, &b});
  if (fn == nullptr || !mm_args(a, b)) return at::cpu::mm(a, b);
  return route(
      KeyBuilder(kMm).tensor(a).tensor(b).key(), [&] { return at::cpu::mm(a, b); },
      [&] {
        auto out = at::empty({a.size(0), b.size(1)}, a.options());
        fn(a, b, out, 0.f, 1.f);
        return out;
      });
}

// The same matrix for every batch entry (an expand of one), in a batch of more than one.
bool broadcast_batch(const at::Tensor& t) { return t.size(0) > 1 && t.stride(0) == 0; }

// out = a b by oneDNN. vmap hands a Linear's directions over as bmm with the unbatched operand
// expanded (batch stride 0). oneDNN broadcasts a batch of one itself; given the expanded one, it
// would first copy it out batch by batch.
void onednn_bmm(OneDnnMatmul fn, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  const bool a_one = broadcast_batch(a), b_one = broadcast_batch(b);
  fn(a_one && !b_one ? a.narrow(0, 0, 1) : a, b_one && !a_one ? b.narrow(0, 0, 1) : b, out, 0.f, 1.f);
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  const OneDnnMatmul fn = routed({&a, &b});
  if (fn == nullptr || !bmm_args(a, b)) return at::cpu::bmm(a, b);
  return route(
      KeyBuilder(kBmm).tensor(a).tensor(b).key(), [&] { return at::cpu::bmm(a, b); },
      [&] {
        auto out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
        onednn_bmm(fn, a, b, out);
        return out;
      });
}

// c broadcasts to [m, n] as addmm's self must.
bool broadcasts(const at::Tensor& c, int64_t m, int64_t n) {
  if (c.dim() == 1) return c.size(0) == 1 || c.size(0) == n;
  return c.dim() == 2 && (c.size(0) == 1 || c.size(0) == m) && (c.size(1) == 1 || c.size(1) == n);
}

bool addmm_args(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                const at::Scalar& alpha) {
  return mm_args(a, b) && broadcasts(c, a.size(0), b.size(1)) && !beta.isComplex() && !alpha.isComplex();
}

// out = beta c + alpha a b by oneDNN, out [m, n] not sharing storage with c. beta = 0: c is not
// read, as in ATen (its NaNs do not reach the result).
void onednn_addmm(OneDnnMatmul fn, const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta,
                  double alpha, const at::Tensor& out) {
  if (beta != 0.0) out.copy_(c.expand({a.size(0), b.size(1)}));
  fn(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
}

at::Tensor addmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                 const at::Scalar& alpha) {
  const OneDnnMatmul fn = routed({&c, &a, &b});
  if (fn == nullptr || !addmm_args(c, a, b, beta, alpha)) return at::cpu::addmm(c, a, b, beta, alpha);
  const double beta_ = beta.toDouble(), alpha_ = alpha.toDouble();
  return route(
      KeyBuilder(kAddmm).scalar(beta_).scalar(alpha_).tensor(c).tensor(a).tensor(b).key(),
      [&] { return at::cpu::addmm(c, a, b, beta, alpha); },
      [&] {
        // A fresh out, whatever c's layout: expand(...).contiguous() would be c itself when c is
        // [m, n] and contiguous, and oneDNN would write the result into the caller's tensor.
        auto out = at::empty({a.size(0), b.size(1)}, a.options());
        onednn_addmm(fn, c, a, b, beta_, alpha_, out);
        return out;
      });
}

// out= may take the result without a copy: its exact shape (ATen would resize it), rows with any row
// stride for a matrix, contiguous for a batch, and no storage shared with an input (oneDNN reads the
// inputs while it writes).
bool writable_out(const at::Tensor& out, at::IntArrayRef shape, std::initializer_list<const at::Tensor*> inputs) {
  if (out.sizes() != shape) return false;
  const bool rows = out.dim() == 2 && out.stride(1) == 1 && out.stride(0) >= std::max<int64_t>(out.size(1), 1);
  if (!(out.dim() == 2 ? rows : out.is_contiguous())) return false;
  if (at::has_internal_overlap(out) != at::MemOverlap::No) return false;
  // Another storage cannot overlap (an expanded input's overlap status would be "too hard").
  for (const at::Tensor* t : inputs) {
    if (out.is_alias_of(*t)) return false;
  }
  return true;
}

// The out= forms, which inductor's compiled products call (its extern GEMM kernels).
at::Tensor& mm_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const OneDnnMatmul fn = routed({&a, &b, &out});
  if (fn == nullptr || !mm_args(a, b) || !writable_out(out, {a.size(0), b.size(1)}, {&a, &b})) {
    return at::cpu::mm_outf(a, b, out);
  }
  route(
      KeyBuilder(kMmOut).tensor(a).tensor(b).tensor(out).key(), [&] { return at::cpu::mm_outf(a, b, out); },
      [&] {
        fn(a, b, out, 0.f, 1.f);
        return out;
      },
      /*writes_out=*/true);
  return out;
}

at::Tensor& bmm_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const OneDnnMatmul fn = routed({&a, &b, &out});
  if (fn == nullptr || !bmm_args(a, b) || !writable_out(out, {a.size(0), a.size(1), b.size(2)}, {&a, &b})) {
    return at::cpu::bmm_outf(a, b, out);
  }
  route(
      KeyBuilder(kBmmOut).tensor(a).tensor(b).tensor(out).key(), [&] { return at::cpu::bmm_outf(a, b, out); },
      [&] {
        onednn_bmm(fn, a, b, out);
        return out;
      },
      /*writes_out=*/true);
  return out;
}

at::Tensor& addmm_out(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                      const at::Scalar& alpha, at::Tensor& out) {
  const OneDnnMatmul fn = routed({&c, &a, &b, &out});
  if (fn == nullptr || !addmm_args(c, a, b, beta, alpha) ||
      !writable_out(out, {a.size(0), b.size(1)}, {&a, &b, &c})) {
    return at::cpu::addmm_outf(c, a, b, beta, alpha, out);
  }
  const double beta_ = beta.toDouble(), alpha_ = alpha.toDouble();
  route(
      KeyBuilder(kAddmmOut).scalar(beta_).scalar(alpha_).tensor(c).tensor(a).tensor(b).tensor(out).key(),
      [&] { return at::cpu::addmm_outf(c, a, b, beta, alpha, out); },
      [&] {
        onednn_addmm(fn, c, a, b, beta_, alpha_, out);
        return out;
      },
      /*writes_out=*/true);
  return out;
}

void register_kernels() {
  // Never destroyed: the kernels stay registered for the process (destroying the Library would
  // deregister them, and at exit it could run after the dispatcher is gone).
  auto* lib = new torch::Library(torch::Library::IMPL, "aten", c10::DispatchKey::CPU, __FILE__, __LINE__);
  lib->impl("mm", TORCH_FN(mm));
  lib->impl("bmm", TORCH_FN(bmm));
  lib->impl("addmm", TORCH_FN(addmm));
  lib->impl("mm.out", TORCH_FN(mm_out));
  lib->impl("bmm.out", TORCH_FN(bmm_out));
  lib->impl("addmm.out", TORCH_FN(addmm_out));
}

}  // namespace

bool enter(bool timed) {
  if (onednn_matmul() == nullptr) return false;
  TORCH_CHECK(t_depth < 64, "matmul_route::enter: more than 64 nested scopes");
  static std::once_flag registered;
  std::call_once(registered, register_kernels);
  const uint64_t bit = uint64_t(1) << t_depth;
  t_untimed = timed ? t_untimed & ~bit : t_untimed | bit;
  ++t_depth;
  return true;
}

void exit() {
  TORCH_CHECK(t_depth > 0, "matmul_route::exit without an open scope on this thread");
  --t_depth;
}

int64_t classes() {
  std::lock_guard<std::mutex> lock(mutex);
  return static_cast<int64_t>(chosen.size());
}

int64_t onednn_classes() {
  std::lock_guard<std::mutex> lock(mutex);
  return std::count_if(chosen.begin(), chosen.end(), [](const auto& entry) { return entry.second; });
}

double deciding_seconds() {
  std::lock_guard<std::mutex> lock(mutex);
  return seconds_deciding;
}

double thread_deciding_seconds() { return t_deciding; }

void forget() {
  std::lock_guard<std::mutex> lock(mutex);
  chosen.clear();
  seconds_deciding = 0.0;
}

}  // namespace matmul_route
}  // namespace cpu
}  // namespace twicediff
