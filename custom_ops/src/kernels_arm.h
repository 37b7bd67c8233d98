// ARM64 kernels of the bitnet custom ops (kernels_arm.cc: NEON; kernels_arm_dotprod.cc: the
// dot-product extension, a translation unit of its own built with -march=armv8.2-a+dotprod,
// because GCC 12 refuses the vdotq intrinsics under a per-function target attribute).
// Each is a twin of the reference in kernels_reference.cc and gives the same bits (BitLinear,
// MatMulI8) or one fixed summation order for every M (MatMulF16, like the x86 kernels).
#pragma once

#include "kernels.h"

#if defined(__aarch64__)

#include <cstdint>

namespace bitnet {

void bitlinear_neon(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
void bitlinear_dotprod(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
void matmul_f16_neon(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_i8_neon(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// y for one row of a group from the 32 sums sum(c * x) (c = w + 1): subtract sum(x), then the
// shared epilogue (bitlinear_output).
static inline void bitlinear_store_group(const BitLinearProblem& p, int64_t row, int64_t g, const int32_t* sums) {
  for (int64_t c = 0; c < kGroupCols && g * kGroupCols + c < p.N; ++c) {
    const int64_t n = g * kGroupCols + c;
    p.y[row * p.N + n] = bitlinear_output(p, row, n, sums[c] - p.xsum[row]);
  }
}

}  // namespace bitnet

#endif  // __aarch64__
