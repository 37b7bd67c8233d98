// ARM64 NEON twins of kernels_reference.cc's BitLinear, MatMulF16 and MatMulI8 references (Advanced SIMD is part
// of every ARMv8-A CPU, so nothing here needs a run-time check). The dot-product BitLinear is
// in kernels_arm_dotprod.cc; dispatch.cc chooses between them from HWCAP.

#include "kernels_arm.h"

#if defined(__aarch64__)

#include <arm_neon.h>

namespace bitnet {

namespace {

constexpr int64_t kArmPrefetchBytes = 1024;  // ahead on the weight stream

// ---- BitLinear: NEON ---------------------------------------------------------------------
// A 16-byte vector v of a 128-byte block holds columns 4v .. 4v+3 of the group, four bytes
// (k = 4i + t, t = 0..3) each; (byte >> 2i) & 3 is code i. smull/smlal multiply the codes
// with the four activations of code i repeated, giving int16 products for two columns per
// half register; addp + sadalp fold the eight products of a column into its int32 lane.
// Bounds: codes <= 2, -128 <= x <= 127, so an int16 lane sums 4 products (|.| <= 1024) and
// the pairwise add two such lanes (<= 2048): exact.
template <int MR>
void bitlinear_neon_tile(const BitLinearProblem& p, int64_t m0, int64_t g) {
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
    __builtin_prefetch(block + kArmPrefetchBytes);
    __builtin_prefetch(block + kArmPrefetchBytes + 64);
    int8x16_t xb[MR][4];  // the four activations of code i, repeated
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) xb[m][i] = vreinterpretq_s8_s32(vdupq_n_s32(load4(xrow[m] + b * kBlockK + 4 * i)));
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const uint8x16_t packed = vld1q_u8(block + 16 * v);
      const int8x16_t c0 = vreinterpretq_s8_u8(vandq_u8(packed, mask));
      const int8x16_t c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(packed, 2), mask));
      const int8x16_t c2 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(packed, 4), mask));
      const int8x16_t c3 = vreinterpretq_s8_u8(vshrq_n_u8(packed, 6));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        // low halves: columns 4v, 4v+1 (smull/smlal); high halves: 4v+2, 4v+3 (smull2/smlal2)
        int16x8_t lo = vmull_s8(vget_low_s8(c0), vget_low_s8(xb[m][0]));
        lo = vmlal_s8(lo, vget_low_s8(c1), vget_low_s8(xb[m][1]));
        lo = vmlal_s8(lo, vget_low_s8(c2), vget_low_s8(xb[m][2]));
        lo = vmlal_s8(lo, vget_low_s8(c3), vget_low_s8(xb[m][3]));
        int16x8_t hi = vmull_high_s8(c0, xb[m][0]);
        hi = vmlal_high_s8(hi, c1, xb[m][1]);
        hi = vmlal_high_s8(hi, c2, xb[m][2]);
        hi = vmlal_high_s8(hi, c3, xb[m][3]);
        acc[m][v] = vpadalq_s16(acc[m][v], vpaddq_s16(lo, hi));
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

// ---- MatMulF16: NEON ---------------------------------------------------------------------
// Weight rows outermost (one sequential stream), each row shared by up to four rows of x.
// Every output is summed in one order whatever M is: four float32x4 accumulators over
// 16-value steps (fmla), then 4-value steps into the first, (a0 + a1) + (a2 + a3), the lanes
// pairwise (faddp), and the last K % 4 values one by one (multiply, then add). fcvtl turns
// halves (subnormals included) into floats exactly.
template <int MR>
void matmul_f16_neon_rows(const MatMulF16Problem& p, int64_t m0, int64_t n) {
  const int64_t K = p.K;
  const uint16_t* w = p.w + n * K;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = p.x + (m0 + m) * K;
  float32x4_t acc[MR][4];  // every loop over it unrolled: registers, not stack (see above)
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[m][i] = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __builtin_prefetch(w + k + kArmPrefetchBytes / 2);
    const float16x8_t h0 = vreinterpretq_f16_u16(vld1q_u16(w + k));
    const float16x8_t h1 = vreinterpretq_f16_u16(vld1q_u16(w + k + 8));
    const float32x4_t wv[4] = {vcvt_f32_f16(vget_low_f16(h0)), vcvt_high_f32_f16(h0),
                               vcvt_f32_f16(vget_low_f16(h1)), vcvt_high_f32_f16(h1)};
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[m][i] = vfmaq_f32(acc[m][i], vld1q_f32(xr[m] + k + 4 * i), wv[i]);
  }
  for (; k + 4 <= K; k += 4) {
    const float32x4_t wv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k)));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) acc[m][0] = vfmaq_f32(acc[m][0], vld1q_f32(xr[m] + k), wv);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const float32x4_t a = vaddq_f32(vaddq_f32(acc[m][0], acc[m][1]), vaddq_f32(acc[m][2], acc[m][3]));
    float s = vaddvq_f32(a);
    for (int64_t j = k; j < K; ++j) {
      const float wj = vget_lane_f32(vget_low_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(w[j])))), 0);
      s += xr[m][j] * wj;
    }
    p.y[(m0 + m) * p.N + n] = s;
  }
}

// ---- MatMulI8: NEON ----------------------------------------------------------------------
// Weight rows outermost (one sequential stream), each 16-byte load shared by up to four rows
// of x and both terms. smull + smlal2 give eight int16 lanes of two products each: |w| <= 128
// and |x| <= 127, so a lane is at most 2 * 16256 = 32512 (exact); sadalp folds lane pairs into
// int32. The last K % 16 values go one by one (no byte past the table is read). Exact integer
// sums, so the bits are the reference's for every M.
int32_t dot_i8_tail(const int8_t* w, const int8_t* x, int64_t k, int64_t K) {
  int32_t s = 0;
  for (; k < K; ++k) s += static_cast<int32_t>(w[k]) * x[k];
  return s;
}

template <int MR>
void matmul_i8_neon_rows(const MatMulI8Problem& p, int64_t m0, int64_t n) {
  const int8_t* w = p.w + n * p.K;
  const int8_t* xr[MR][2];
  int32x4_t acc[MR][2];  // every loop over it unrolled: registers, not stack (see above)
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    xr[m][0] = p.xq + (m0 + m) * p.Kp;
    xr[m][1] = p.rq + (m0 + m) * p.Kp;
    acc[m][0] = acc[m][1] = vdupq_n_s32(0);
  }
  int64_t k = 0;
  for (; k + 16 <= p.K; k += 16) {
    __builtin_prefetch(w + k + kArmPrefetchBytes);
    const int8x16_t wv = vld1q_s8(w + k);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int t = 0; t < 2; ++t) {
        const int8x16_t xv = vld1q_s8(xr[m][t] + k);
        const int16x8_t prod = vmlal_high_s8(vmull_s8(vget_low_s8(wv), vget_low_s8(xv)), wv, xv);
        acc[m][t] = vpadalq_s16(acc[m][t], prod);
      }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const int32_t hi = vaddvq_s32(acc[m][0]) + dot_i8_tail(w, xr[m][0], k, p.K);
    const int32_t lo = vaddvq_s32(acc[m][1]) + dot_i8_tail(w, xr[m][1], k, p.K);
    p.y[(m0 + m) * p.N + n] = head_output(p, m0 + m, n, hi, lo);
  }
}

}  // namespace

void bitlinear_neon(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) bitlinear_neon_tile<2>(p, m, g);
    if (m < m1) bitlinear_neon_tile<1>(p, m, g);
  }
}

void matmul_f16_neon(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) matmul_f16_neon_rows<4>(p, m, n);
    switch (m1 - m) {
      case 3: matmul_f16_neon_rows<3>(p, m, n); break;
      case 2: matmul_f16_neon_rows<2>(p, m, n); break;
      case 1: matmul_f16_neon_rows<1>(p, m, n); break;
      default: break;
    }
  }
}

void matmul_i8_neon(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_neon_rows<4>, matmul_i8_neon_rows<3>, matmul_i8_neon_rows<2>, matmul_i8_neon_rows<1>>(
      p, m0, m1, n0, n1);
}

}  // namespace bitnet

#endif  // __aarch64__
