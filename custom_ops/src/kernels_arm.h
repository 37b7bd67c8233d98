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

}  // namespace bitnet

#endif  // __aarch64__
