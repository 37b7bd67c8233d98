// x86 kernels for AVX2 + FMA + F16C machines (Haswell, Zen 1 and later) and AVX-VNNI ones
// (Alder Lake, Sapphire Rapids): BitLinear, MatMulF16 and MatMulI8. Each is a twin of its
// reference in kernels_reference.cc. The library is built for baseline x86-64; these functions
// carry target attributes (compiler.h) and run only when dispatch.cc finds the features.

#include "kernels_x86.h"

#if BITNET_X86_SIMD

#include <algorithm>
#include <cstring>

#include <immintrin.h>

namespace bitnet {

// ---- BitLinear: AVX2 -----------------------------------------------------------------------
// vpmaddubsw (u8 codes x s8 activations -> int16 pairs) then vpmaddwd with ones -> int32.
// The four int16 products of a block (codes <= 2, |x| <= 128) sum to at most 2048: no
// saturation. Each 64-byte block is two 32-byte halves: columns 0-7 and 8-15 of the group.

constexpr int64_t kAvx2PrefetchBytes = 4096;  // ahead on the weight stream (1024 streamed 20 % slower)

// y for one row of a group from its four int32 quarter accumulators (sum(c * x) per column).
BITNET_AVX2 static void store_group_outputs_avx2(const BitLinearProblem& p, int64_t row, int64_t g, const __m256i (&acc)[4]) {
  alignas(32) int32_t dots[kGroupCols];
  for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(dots + 8 * q), acc[q]);
  bitlinear_store_group(p, row, g, dots);
}

template <int MR>
BITNET_AVX2 static void bitlinear_avx2_tile(const BitLinearProblem& p, int64_t m0, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][4];  // four quarters of the block: columns 8q .. 8q+7 of the group
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_si256();
  for (int64_t b = 0; b < nblocks; ++b) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * kBlockBytes + q * 32));
      const __m256i c0 = _mm256_and_si256(packed, mask);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(packed, 2), mask);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(packed, 6), mask);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const int8_t* xr = p.xq + (m0 + m) * p.Kp + b * kBlockK;
        __m256i s = _mm256_maddubs_epi16(c0, _mm256_set1_epi32(load4(xr)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c1, _mm256_set1_epi32(load4(xr + 4))));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c2, _mm256_set1_epi32(load4(xr + 8))));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c3, _mm256_set1_epi32(load4(xr + 12))));
        acc[m][q] = _mm256_add_epi32(acc[m][q], _mm256_madd_epi16(s, ones));
      }
    }
  }
  for (int m = 0; m < MR; ++m) store_group_outputs_avx2(p, m0 + m, g, acc[m]);
}

// Decode (one row): the codes are taken from each 32-byte vector with masks instead of
// shifts where possible. The low nibble of a byte holds codes c0 + 4 c1, the high nibble
// (one shift by 4) c2 + 4 c3, so `& 3` gives c0 (c2) and `& 12` gives 4 c1 (4 c3): vpmaddubsw
// of those with the broadcast activations yields int16 sums at scale 1 and at scale 4, kept
// in two int16 accumulators per quarter and widened to int32 every kAvx2Int16Blocks blocks.
// Per 32 weight bytes: 1 shift, 4 and, 4 vpmaddubsw, 4 add = 13 vector ops (the shift-per-code
// loop above needs 3 shifts, 4 and, 4 vpmaddubsw and 5 adds/widenings = 16).
// Bounds (codes <= 2, -128 <= x <= 127): one vpmaddubsw lane is a sum of two products, at
// most 2 * 2 * 128 = 512 in magnitude at scale 1 and 2048 at scale 4; two of each per block
// and 8 blocks give at most 8192 and 32768 = |INT16_MIN| (the positive side stays at
// 8 * 2 * 4 * 2 * 2 * 127 = 32512): exact int16 sums, never saturated or wrapped.
constexpr int64_t kAvx2Int16Blocks = 8;

BITNET_AVX2 static void bitlinear_avx2_row(const BitLinearProblem& p, int64_t m, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  const int8_t* xr = p.xq + m * p.Kp;
  const __m256i mask1 = _mm256_set1_epi8(3), mask4 = _mm256_set1_epi8(12);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[4];  // int32 per quarter: columns 8q .. 8q+7 of the group
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < nblocks; b0 += kAvx2Int16Blocks) {
    const int64_t b1 = std::min(b0 + kAvx2Int16Blocks, nblocks);
    // One 64-byte half of the chunk's blocks at a time (the other half is then read from L1):
    // 2 quarters x 2 int16 sums stay in registers next to the 4 broadcasts and 2 masks.
    for (int h = 0; h < 2; ++h) {
      __m256i lo[2], hi[2];  // int16 sums at scale 1 and at scale 4
      for (int q = 0; q < 2; ++q) lo[q] = hi[q] = _mm256_setzero_si256();
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* half = wg + b * kBlockBytes + 64 * h;
        prefetch_weights(half + kAvx2PrefetchBytes);
        const __m256i x0 = _mm256_set1_epi32(load4(xr + b * kBlockK));
        const __m256i x1 = _mm256_set1_epi32(load4(xr + b * kBlockK + 4));
        const __m256i x2 = _mm256_set1_epi32(load4(xr + b * kBlockK + 8));
        const __m256i x3 = _mm256_set1_epi32(load4(xr + b * kBlockK + 12));
#pragma GCC unroll 2
        for (int q = 0; q < 2; ++q) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half + q * 32));
          const __m256i high = _mm256_srli_epi16(packed, 4);  // bits from the next byte land above bit 3
          lo[q] = _mm256_add_epi16(lo[q], _mm256_maddubs_epi16(_mm256_and_si256(packed, mask1), x0));
          hi[q] = _mm256_add_epi16(hi[q], _mm256_maddubs_epi16(_mm256_and_si256(packed, mask4), x1));
          lo[q] = _mm256_add_epi16(lo[q], _mm256_maddubs_epi16(_mm256_and_si256(high, mask1), x2));
          hi[q] = _mm256_add_epi16(hi[q], _mm256_maddubs_epi16(_mm256_and_si256(high, mask4), x3));
        }
      }
      // Widen to int32; hi holds multiples of 4 (4 c1, 4 c3), so >> 2 divides exactly.
      for (int q = 0; q < 2; ++q) {
        const __m256i wide_lo = _mm256_madd_epi16(lo[q], ones);
        const __m256i wide_hi = _mm256_srai_epi32(_mm256_madd_epi16(hi[q], ones), 2);
        acc[2 * h + q] = _mm256_add_epi32(acc[2 * h + q], _mm256_add_epi32(wide_lo, wide_hi));
      }
    }
  }
  store_group_outputs_avx2(p, m, g, acc);
}

BITNET_AVX2 void bitlinear_avx2(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) bitlinear_avx2_tile<2>(p, m, g);
    if (m < m1) bitlinear_avx2_row(p, m, g);
  }
}

// ---- MatMulF16: AVX2 + F16C + FMA ---------------------------------------------------------
// This kernel and its AVX-512 twin walk the table one weight row at a time (the whole slice is one sequential stream;
// interleaving rows halved the bandwidth), sharing each loaded row between up to MR rows of x.
// Every output is summed in the same order whatever M is (four accumulators over 4-vector
// steps, the same tail, the same reduction), so a row's logits do not depend on the batch.

BITNET_AVX2 static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR>
BITNET_AVX2 static void matmul_f16_avx2_rows(const MatMulF16Problem& p, int64_t m0, int64_t n) {
  const int64_t K = p.K;
  const uint16_t* w = p.w + n * K;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = p.x + (m0 + m) * K;
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // one 64-byte line of the weight row
    prefetch_weights(w + k + kF16PrefetchHalves);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8 * i)));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m][i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[m] + k + 8 * i), wv, acc[m][i]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[m] + k), wv, acc[m][0]);
  }
  for (int m = 0; m < MR; ++m) {
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
    for (int64_t j = k; j < K; ++j) s += xr[m][j] * _cvtsh_ss(w[j]);  // no FMA: -ffp-contract=off
    p.y[(m0 + m) * p.N + n] = s;
  }
}

BITNET_AVX2 void matmul_f16_avx2(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_f16_avx2_rows<4>, matmul_f16_avx2_rows<3>, matmul_f16_avx2_rows<2>,
                  matmul_f16_avx2_rows<1>>(p, m0, m1, n0, n1);
}

// ---- MatMulI8: AVX2 (vpsignb + vpmaddubsw + vpmaddwd; see kernels_x86.h) ------------------

namespace {
// The last K % 32 bytes of a weight row, zero padded: the vector code then reads no byte past
// the table (xq is zero past K, so the padding adds nothing).
struct TailBuffer {
  alignas(64) int8_t bytes[64];
  TailBuffer(const int8_t* w, int64_t count) {
    std::memset(bytes, 0, sizeof bytes);
    std::memcpy(bytes, w, static_cast<size_t>(count));
  }
};
}  // namespace

BITNET_AVX2 static inline __m256i dot32_avx2(__m256i acc, __m256i w, __m256i x) {
  const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
}

BITNET_AVX2 static inline int32_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// acc[m][0] sums w . xq, acc[m][1] sums w . rq (both terms of row m) for one weight row.
template <int MR>
BITNET_AVX2 static void matmul_i8_avx2_rows(const MatMulI8Problem& p, int64_t m0, int64_t n) {
  const int8_t* w = p.w + n * p.K;
  const int8_t* xr[MR][2];
  for (int m = 0; m < MR; ++m) xr[m][0] = p.xq + (m0 + m) * p.Kp, xr[m][1] = p.rq + (m0 + m) * p.Kp;
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 64 <= p.K; k += 64) {
    prefetch_weights(w + k + kI8PrefetchBytes);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32 * h));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
        for (int t = 0; t < 2; ++t)
          acc[m][t] = dot32_avx2(acc[m][t], wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m][t] + k + 32 * h)));
    }
  }
  for (; k < p.K; k += 32) {
    const TailBuffer tail(w + k, std::min<int64_t>(32, p.K - k));
    const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail.bytes));
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < 2; ++t)
        acc[m][t] = dot32_avx2(acc[m][t], wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m][t] + k)));
  }
  for (int m = 0; m < MR; ++m)
    p.y[(m0 + m) * p.N + n] = head_output(p, m0 + m, n, hsum256_epi32(acc[m][0]), hsum256_epi32(acc[m][1]));
}

BITNET_AVX2 void matmul_i8_avx2(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_avx2_rows<4>, matmul_i8_avx2_rows<3>, matmul_i8_avx2_rows<2>, matmul_i8_avx2_rows<1>>(
      p, m0, m1, n0, n1);
}

// ---- MatMulI8: AVX-VNNI (256-bit vpdpbusd) ---------------------------------------------------

template <int MR>
BITNET_AVXVNNI static void matmul_i8_avxvnni_rows(const MatMulI8Problem& p, int64_t m0, int64_t n) {
  const int8_t* w = p.w + n * p.K;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int8_t* xr[MR][2];
  for (int m = 0; m < MR; ++m) xr[m][0] = p.xq + (m0 + m) * p.Kp, xr[m][1] = p.rq + (m0 + m) * p.Kp;
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 64 <= p.K; k += 64) {
    prefetch_weights(w + k + kI8PrefetchBytes);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32 * h)), flip);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
        for (int t = 0; t < 2; ++t)
          acc[m][t] = _mm256_dpbusd_avx_epi32(acc[m][t], wu,
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m][t] + k + 32 * h)));
    }
  }
  for (; k < p.K; k += 32) {  // padding bytes become 128 but meet q = 0
    const TailBuffer tail(w + k, std::min<int64_t>(32, p.K - k));
    const __m256i wu = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail.bytes)), flip);
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < 2; ++t)
        acc[m][t] = _mm256_dpbusd_avx_epi32(acc[m][t], wu, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m][t] + k)));
  }
  for (int m = 0; m < MR; ++m) {
    const int64_t row = m0 + m;
    p.y[row * p.N + n] = head_output(p, row, n, remove_offset(hsum256_epi32(acc[m][0]), p.xsum[row]),
                                     remove_offset(hsum256_epi32(acc[m][1]), p.rsum[row]));
  }
}

BITNET_AVXVNNI void matmul_i8_avxvnni(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_avxvnni_rows<4>, matmul_i8_avxvnni_rows<3>, matmul_i8_avxvnni_rows<2>,
                 matmul_i8_avxvnni_rows<1>>(p, m0, m1, n0, n1);
}

}  // namespace bitnet

#endif  // BITNET_X86_SIMD
