// GEMMs of the CPU kernels: oneDNN's matmul for float32 where torch carries it, ATen's (MKL or
// OpenBLAS) otherwise. See cpu/gemm.cpp.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace twicediff {
namespace cpu {

// out = beta * out + alpha * a b for 2-d a [M, K], b [K, N] and out [M, N] of their dtype (beta = 0:
// out's contents are not read).
void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha = 1.0);

// Which library takes float32 GEMMs in this process now: "onednn" or "blas".
std::string gemm_backend();

// Whether this thread's GEMMs are sent to ATen's BLAS whatever gemm_backend() says: the choice of
// the native engine's probe (python/twicediff/torch/engines/native.py) for the call this thread
// runs. Per thread, so that concurrent calls choosing differently do not switch each other's
// GEMMs. A parallel region carries it into its workers with a BlasInThread of the caller's value.
bool blas_in_thread();
// Sets this thread's choice; returns the one it replaces.
bool set_blas_in_thread(bool on);

// This thread on ATen's BLAS (on = true) or not, for the scope's life.
class BlasInThread {
 public:
  explicit BlasInThread(bool on) : was_(set_blas_in_thread(on)) {}
  ~BlasInThread() { set_blas_in_thread(was_); }
  BlasInThread(const BlasInThread&) = delete;
  BlasInThread& operator=(const BlasInThread&) = delete;

 private:
  bool was_;
};

// at::native::mkldnn_matmul (result = beta result + alpha mat1 mat2), when float32 GEMMs may go to
// oneDNN in this process now; nullptr when they may not (TWICEDIFF_CPU_GEMM=blas, oneDNN disabled in
// torch, absent or refused). Its argument checks run before it writes; a c10::Error it throws should
// be passed to refuse_onednn, which keeps every later GEMM on ATen.
using OneDnnMatmul = void (*)(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                              float alpha);
OneDnnMatmul onednn_matmul();
void refuse_onednn(const c10::Error& e);

// oneDNN's error message when it refused a float32 GEMM in this process ("" when it never did).
std::string gemm_refusal();

}  // namespace cpu
}  // namespace twicediff
