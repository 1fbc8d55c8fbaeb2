// GEMMs of the CPU kernels.
//
// On x86 CPUs that are not Intel's, MKL runs its AVX2 code path even where the CPU has AVX-512,
// and oneDNN's AVX-512 kernels run float32 GEMMs about twice as fast at full float32 precision;
// limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), oneDNN runs them at MKL's speed. NOTE: measured in
// benchmarks/results/cpu_gemm.md. torch links oneDNN (as "mkldnn") on x86 and aarch64 and exports
// at::native::mkldnn_matmul (out = beta out + alpha a b; a and b contiguous or transposed, else
// copied; out row-major with any row stride) without shipping its header. It is looked up once at
// run time, so a torch without it, or with another signature, keeps ATen's GEMM instead of failing
// to load, and a oneDNN that refuses float32 GEMMs on this CPU (tried once with a 1×1 product;
// cpu_gemm_refusal() in the Python module gives its message) does too. float64 has no oneDNN
// kernel and always goes to ATen. torch's settings that allow reduced
// precision in oneDNN's float32 matmuls (torch.set_float32_matmul_precision("medium"),
// torch.backends.mkldnn.matmul.fp32_precision) may reach these GEMMs too; in our tests results
// stayed at float32 accuracy under both.
//
// TWICEDIFF_CPU_GEMM=blas (read at every GEMM, so a process can switch) sends every GEMM to ATen, as
// does torch.backends.mkldnn.enabled = False; "auto" or unset takes oneDNN where it can.

#include "cpu/gemm.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "gemm_common.h"

namespace twicediff {
namespace cpu {
namespace {

using MatmulFn = OneDnnMatmul;

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta result + alpha mat1 mat2
constexpr const char* kMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

std::atomic<bool> refused{false};  // oneDNN rejected a float32 GEMM once: ATen from then on
std::mutex refusal_mutex;
std::string refusal_message;  // oneDNN's error at that refusal

}  // namespace

void refuse_onednn(const c10::Error& e) {
  {
    std::lock_guard<std::mutex> lock(refusal_mutex);
    if (refusal_message.empty()) refusal_message = e.what_without_backtrace();
  }
  refused.store(true, std::memory_order_relaxed);
}

namespace {

MatmulFn lookup() {
  if (!at::hasMKLDNN()) return nullptr;
  void* sym = dlsym(RTLD_DEFAULT, kMatmulSymbol);
  if (sym == nullptr) {
    // torch's libraries may have been loaded into a local namespace; ask libtorch_cpu itself.
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, kMatmulSymbol);
  }
  auto fn = reinterpret_cast<MatmulFn>(sym);
  if (fn == nullptr) return nullptr;
  // One 1×1 product first: some builds refuse every float32 GEMM on CPUs without bf16 support
  // (torch 2.14 on an AVX2-only AMD EPYC: "mkldnn_matmul bf16 path needs ... avx512bw"), and the
  // backend reported by gemm_backend() should be the one the GEMMs will use from the first call.
  try {
    const auto one = at::ones({1, 1}, at::kFloat);
    fn(one, one, at::empty({1, 1}, at::kFloat), 0.f, 1.f);
  } catch (const c10::Error& e) {
    refuse_onednn(e);
  }
  return fn;
}

bool blas_forced() {
  const char* env = std::getenv("TWICEDIFF_CPU_GEMM");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(env, "blas") == 0, "TWICEDIFF_CPU_GEMM must be 'auto' or 'blas', got '", env, "'");
  return true;
}

// This thread's GEMMs on ATen's BLAS whatever oneDNN could do (set_blas_in_thread, gemm.h).
thread_local bool t_blas = false;

}  // namespace

MatmulFn onednn_matmul() {
  static const MatmulFn fn = lookup();
  if (blas_forced() || fn == nullptr || refused.load(std::memory_order_relaxed)) return nullptr;
  // torch.backends.mkldnn.enabled = False keeps torch itself off oneDNN; it keeps these GEMMs off too.
  if (!at::globalContext().userEnabledMkldnn()) return nullptr;
  return fn;
}

namespace {

// oneDNN writes a row-major out with any row stride (a block of a larger matrix), not other layouts.
bool rows_with_stride(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1);
}

}  // namespace

void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  const MatmulFn fn = onednn_matmul();  // checks TWICEDIFF_CPU_GEMM whatever the dtype and thread
  if (t_blas) return aten_gemm(out, a, b, beta, alpha);
  if (fn != nullptr && out.scalar_type() == at::kFloat && rows_with_stride(out) && a.numel() > 0 && b.numel() > 0) {
    try {
      fn(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
      return;
    } catch (const c10::Error& e) {  // its argument checks run before it writes out
      refuse_onednn(e);
    }
  }
  aten_gemm(out, a, b, beta, alpha);
}

std::string gemm_backend() { return onednn_matmul() != nullptr ? "onednn" : "blas"; }

bool blas_in_thread() { return t_blas; }

bool set_blas_in_thread(bool on) {
  const bool was = t_blas;
  t_blas = on;
  return was;
}

std::string gemm_refusal() {
  onednn_matmul();  // the first-use check above
  std::lock_guard<std::mutex> lock(refusal_mutex);
  return refusal_message;
}

namespace {

void gemm_op_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  check_gemm_args("gemm_", out, a, b);
  gemm(out, a, b, beta, alpha);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(twicediff, CPU, m) { m.impl("gemm_", &cpu::gemm_op_cpu); }

}  // namespace twicediff
