// ARM64 BitLinear with the dot-product extension (sdot, ARMv8.2 FEAT_DotProd: Cortex-A55/A76
// and later, Neoverse N1/V1, Apple M1 and later). This translation unit alone is built with
// -march=armv8.2-a+dotprod (custom_ops/build.py): GCC 12 refuses the vdotq intrinsics under
// a per-function target attribute. dispatch.cc calls it only when HWCAP says the CPU has
// sdot, and everything here has internal linkage except the kernel itself, so no function
// compiled for ARMv8.2 can be picked by the linker for code that runs on other CPUs.

#include "kernels_arm.h"

#if defined(__aarch64__)

#include <arm_neon.h>

namespace bitnet {

namespace {

constexpr int64_t kDotPrefetchBytes = 1024;  // ahead on the weight stream

// A 16-byte vector v of a 128-byte block holds columns 4v .. 4v+3 of the group, four bytes
// (k = 4i + t) each, code i in bits 2i..2i+1. sdot (by element) multiplies each column's four
// codes of index i with the four activations 4i..4i+3 of the block (lane i of one 16-byte
// load of x) and adds them to the column's int32 lane: the vpdpbusd of the x86 kernel, with
// codes 0..2 as signed bytes. Exact: |one sdot| <= 4 * 2 * 128.
template <int MR>
void bitlinear_dotprod_tile(const BitLinearProblem& p, int64_t m0, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  const uint8x16_t mask = vdupq_n_u8(3);
  const int8_t* xrow[MR];
  for (int m = 0; m < MR; ++m) xrow[m] = p.xq + (m0 + m) * p.Kp;
  // Every loop over acc is unrolled, so the accumulators live in registers (a loop left rolled
  // makes GCC keep a copy of the array on the stack, stored on every iteration).
  int32x4_t acc[MR][8];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) acc[m][v] = vdupq_n_s32(0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* block = wg + b * kBlockBytes;
    __builtin_prefetch(block + kDotPrefetchBytes);
    __builtin_prefetch(block + kDotPrefetchBytes + 64);
    int8x16_t xv[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) xv[m] = vld1q_s8(xrow[m] + b * kBlockK);
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const uint8x16_t packed = vld1q_u8(block + 16 * v);
      const int8x16_t c0 = vreinterpretq_s8_u8(vandq_u8(packed, mask));
      const int8x16_t c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(packed, 2), mask));
      const int8x16_t c2 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(packed, 4), mask));
      const int8x16_t c3 = vreinterpretq_s8_u8(vshrq_n_u8(packed, 6));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        acc[m][v] = vdotq_laneq_s32(acc[m][v], c0, xv[m], 0);
        acc[m][v] = vdotq_laneq_s32(acc[m][v], c1, xv[m], 1);
        acc[m][v] = vdotq_laneq_s32(acc[m][v], c2, xv[m], 2);
        acc[m][v] = vdotq_laneq_s32(acc[m][v], c3, xv[m], 3);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    int32_t sums[kGroupCols];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) vst1q_s32(sums + 4 * v, acc[m][v]);
    bitlinear_store_group(p, m0 + m, g, sums);
  }
}

}  // namespace

void bitlinear_dotprod(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) bitlinear_dotprod_tile<2>(p, m, g);
    if (m < m1) bitlinear_dotprod_tile<1>(p, m, g);
  }
}

}  // namespace bitnet

#endif  // __aarch64__
