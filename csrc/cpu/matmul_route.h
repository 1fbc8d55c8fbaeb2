// torch's own float32 matmuls on the CPU (aten::mm, addmm, bmm) inside the generic engines'
// products (func, autograd, loop and compiled), each shape class sent to the faster of oneDNN and
// ATen's BLAS, chosen by timing both.
//
// Why: a vmapped forward-over-reverse product is GEMM-bound on a transformer, and ATen sends
// float32 GEMMs to MKL, which runs its AVX2 code path on AMD CPUs that have AVX-512; oneDNN's
// AVX-512 kernels, which the native op uses (cpu/gemm.h), run many of the product's shapes 2-3x
// faster at full float32 precision (benchmarks/results/curvlinops_cpu.md). torch offers no switch
// for that: it sends float32 matmuls to oneDNN only where reduced precision is allowed.
//
// How: the first enter() of the process registers kernels for those three operators and their
// out= forms (which inductor's compiled code calls) under the CPU dispatch key, ahead of ATen's.
// Outside a scope, and for anything they do not take (another dtype, an empty operand, arguments
// ATen would refuse, an out= ATen would resize or that shares an input's storage), they call ATen's
// CPU kernel itself (at::cpu::), so every other caller in the process gets ATen's results, bit for
// bit. Inside a scope (per thread: the products run their autograd on the calling thread on the
// CPU), the first call of a shape class (operator, sizes, strides, alpha and beta) times both
// libraries a few times and keeps the faster for the process; that call returns the winner's
// result, as every later one does. Deciding stops when kDecideBudgetSeconds have gone on it or
// kMaxClasses classes are known: later new classes stay on ATen.
//
// Results differ from ATen's by float32 rounding only (another order of summation). Not entered
// when TWICEDIFF_CPU_GEMM=blas, torch.backends.mkldnn.enabled is False or oneDNN refused float32
// GEMMs (cpu/gemm.h, onednn_matmul()): then the operators stay ATen's own.
#pragma once
#include <cstdint>

namespace twicediff {
namespace cpu {
namespace matmul_route {

constexpr double kDecideBudgetSeconds = 2.0;  // the most time spent timing, per process
constexpr int64_t kMaxClasses = 4096;         // the most shape classes remembered

// Opens a scope on this thread (nested scopes counted; the innermost's `timed` holds); registers
// the kernels on first use. timed = false sends every matmul the kernels take to oneDNN without
// timing or recording (TWICEDIFF_MATMUL_ROUTE=onednn). Returns false, opening nothing, when oneDNN
// may not take float32 GEMMs now.
bool enter(bool timed);
// Closes a scope that enter() opened, restoring the enclosing scope's `timed`.
void exit();
// Shape classes decided so far, and how many of them went to oneDNN.
int64_t classes();
int64_t onednn_classes();
// Seconds spent timing so far.
double deciding_seconds();
// Seconds this thread spent timing so far: what a timed call of an engine must leave out, the
// engine's later calls not paying it (python/twicediff/torch/engines/probe.py).
double thread_deciding_seconds();
// Forgets every decision (and the time spent), so the next calls decide again.
void forget();

}  // namespace matmul_route
}  // namespace cpu
}  // namespace twicediff
