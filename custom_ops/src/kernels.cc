// BitLinear and MatMulF16 kernels: one plain C++ reference and its SIMD variants side by side.
// The SIMD variants are compiled with per-function target attributes (the library itself is
// built for baseline x86-64), so one binary runs on any x86-64 and dispatches at load time.
// All BitLinear kernels produce bit-identical results: the int32 dot products are exact and
// the float epilogue is the same two IEEE operations everywhere.

#include "kernels.h"
#include "kernels_arm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if BITNET_X86_SIMD
#define BITNET_X86 1
#include <immintrin.h>
#endif

namespace bitnet {

// ---- Activation quantization (shared by every kernel, so their inputs are identical) ---------

// Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to the nearest integer,
// ties to even, in the default rounding mode: torch.round / numpy.round semantics, and unlike
// nearbyintf it vectorizes without -ffast-math. |x * s| <= 127 (+1 ulp) here.
static inline float round_half_even(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

BITNET_TARGET_CLONES("avx512f", "avx2", "default")
void quantize_rows(const float* x, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                   int8_t* xq, int32_t* xsum, float* xscale) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = xq + m * Kp;
    // max |x| on the bit patterns: for non-negative floats the integer order is the float
    // order, and anything >= 0x7f800000 is inf or NaN. Integer max vectorizes; float max of
    // NaN-carrying data would not be well defined.
    uint32_t max_bits = 0;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, xr + k, 4);
      bits &= 0x7fffffffu;
      max_bits = bits > max_bits ? bits : max_bits;
    }
    if (max_bits >= 0x7f800000u) {  // inf or NaN in the row: outputs NaN (documented)
      std::memset(qr, 0, static_cast<size_t>(Kp));
      xsum[m] = 0;
      xscale[m] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    float amax;
    std::memcpy(&amax, &max_bits, 4);
    const float s = 127.0f / std::max(amax, 1e-5f);
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      float v = round_half_even(xr[k] * s);
      v = std::min(std::max(v, -128.0f), 127.0f);
      const int8_t q = static_cast<int8_t>(v);
      qr[k] = q;
      sum += q;
    }
    for (int64_t k = K; k < Kp; ++k) qr[k] = 0;
    xsum[m] = sum;
    xscale[m] = s;
  }
}

// Four int8 activations as one int32 (memcpy: no aliasing or alignment assumptions).
static inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The epilogue every BitLinear kernel shares: y = (xq . w) / s * S.
static inline float bitlinear_output(const BitLinearProblem& p, int64_t m, int64_t n, int32_t dot) {
  return static_cast<float>(dot) / p.xscale[m] * p.S[p.per_channel_scale ? n : 0];
}

// ---- BitLinear: reference ------------------------------------------------------------------

static void bitlinear_reference(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  const int64_t nblocks = p.Kp / kBlockK;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = p.xq + m * p.Kp;
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
      for (int64_t c = 0; c < kGroupCols; ++c) {
        const int64_t n = g * kGroupCols + c;
        if (n >= p.N) break;
        const int64_t offset = (c / kHalfCols) * 64 + (c % kHalfCols) * 4;  // half, then lane
        int32_t dot = 0;
        for (int64_t b = 0; b < nblocks; ++b) {
          for (int i = 0; i < 4; ++i) {
            for (int t = 0; t < 4; ++t) {
              const int w = ((wg[b * kBlockBytes + offset + t] >> (2 * i)) & 3) - 1;
              dot += w * xr[b * kBlockK + i * 4 + t];
            }
          }
        }
        p.y[m * p.N + n] = bitlinear_output(p, m, n, dot);
      }
    }
  }
}

// ---- MatMulF16: reference ------------------------------------------------------------------

static float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // zero
  } else {
    // subnormal half: value = mant * 2^-24, exactly representable as a float
    float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static void matmul_f16_reference(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = p.x + m * p.K;
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* wr = p.w + n * p.K;
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += xr[k] * half_to_float(wr[k]);
      p.y[m * p.N + n] = acc;
    }
  }
}

#if BITNET_X86

// ---- BitLinear: AVX2 -----------------------------------------------------------------------
// vpmaddubsw (u8 codes x s8 activations -> int16 pairs) then vpmaddwd with ones -> int32.
// The four int16 products of a block (codes <= 2, |x| <= 128) sum to at most 2048: no
// saturation. Each 64-byte block is two 32-byte halves: columns 0-7 and 8-15 of the group.

#define BITNET_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int64_t kAvx2PrefetchBytes = 4096;  // ahead on the weight stream (1024 streamed 20 % slower)

// y for one row of a group from its four int32 quarter accumulators (sum(c * x) per column).
BITNET_AVX2 static void store_group_outputs_avx2(const BitLinearProblem& p, int64_t row, int64_t g, const __m256i (&acc)[4]) {
  alignas(32) int32_t dots[kGroupCols];
  for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(dots + 8 * q), acc[q]);
  for (int64_t c = 0; c < kGroupCols && g * kGroupCols + c < p.N; ++c) {
    const int64_t n = g * kGroupCols + c;
    p.y[row * p.N + n] = bitlinear_output(p, row, n, dots[c] - p.xsum[row]);
  }
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
        _mm_prefetch(reinterpret_cast<const char*>(half + kAvx2PrefetchBytes), _MM_HINT_T0);
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

BITNET_AVX2 static void bitlinear_avx2(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) bitlinear_avx2_tile<2>(p, m, g);
    if (m < m1) bitlinear_avx2_row(p, m, g);
  }
}

// ---- BitLinear: AVX-512 VNNI ---------------------------------------------------------------
// A 128-byte block -> 2 halves x 4 code vectors; each vpdpbusd multiplies 16 columns x 4 k
// with the 4 activations broadcast. A tile is MR >= 2 rows x one group (32 columns), sharing
// each unpacked block between the rows; one row (decode) has a kernel of its own below.

#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

constexpr int64_t kPrefetchBytes = 4096;  // ahead on the weight stream: 1024 left a core 13 % slower
                                          // (the hardware prefetcher alone, at half bandwidth)

// y for one row of a group from its two int32 half accumulators (sum(c * x) per column):
// the same two IEEE operations as bitlinear_output, (dot / s) * S.
BITNET_AVX512 static void store_group_outputs_vnni(const BitLinearProblem& p, int64_t row, int64_t g, const __m512i (&acc)[2]) {
  const __m512i xsum = _mm512_set1_epi32(p.xsum[row]);
  const __m512 xscale = _mm512_set1_ps(p.xscale[row]);
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = g * kGroupCols + h * kHalfCols;
    if (n0 >= p.N) break;
    const __m512i dot = _mm512_sub_epi32(acc[h], xsum);
    const int64_t valid = std::min<int64_t>(kHalfCols, p.N - n0);
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 scale = p.per_channel_scale ? _mm512_maskz_loadu_ps(keep, p.S + n0) : _mm512_set1_ps(p.S[0]);
    const __m512 y = _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(dot), xscale), scale);
    _mm512_mask_storeu_ps(p.y + row * p.N + n0, keep, y);
  }
}

template <int MR>
BITNET_AVX512 static void bitlinear_vnni_tile(const BitLinearProblem& p, int64_t m0, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const __m512i mask = _mm512_set1_epi8(3);
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  const int8_t* xrow[MR];
  for (int m = 0; m < MR; ++m) xrow[m] = p.xq + (m0 + m) * p.Kp;

  __m512i acc[MR][2];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) acc[m][h] = _mm512_setzero_si512();

  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* block = wg + b * kBlockBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64), _MM_HINT_T0);
    __m512i c[2][4];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512i packed = _mm512_loadu_si512(block + 64 * h);
      c[h][0] = _mm512_and_si512(packed, mask);
      c[h][1] = _mm512_and_si512(_mm512_srli_epi16(packed, 2), mask);
      c[h][2] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
      c[h][3] = _mm512_and_si512(_mm512_srli_epi16(packed, 6), mask);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const int8_t* xr = xrow[m] + b * kBlockK;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512i xb = _mm512_set1_epi32(load4(xr + 4 * i));
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], c[0][i], xb);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], c[1][i], xb);
      }
    }
  }

  for (int m = 0; m < MR; ++m) store_group_outputs_vnni(p, m0 + m, g, acc[m]);
}

// Decode (one row): no shifts. `packed & (3 << 2i)` is 4^i c_i as an unsigned byte (0, 4^i or
// 2 * 4^i <= 128), so vpdpbusd of it with the activations of code i sums 4^i c_i x into an
// accumulator of its own (2 halves x 4 codes = 8 independent chains); at the end acc_i >> 2i
// divides exactly. Per 64 weight bytes: 4 vpandd + 4 vpdpbusd (the shift loop above needs 3
// more shifts, which compete with vpdpbusd for the same port). Bound: one vpdpbusd adds at
// most 4 * 128 * 128 = 2^16 to acc_3, so chunks of kVnniRowChunk blocks keep it below 2^31.
constexpr int64_t kVnniRowChunk = 16384;

// vpdpbusd with the accumulator in any of the 32 registers. With the intrinsic, GCC 12 moved
// the 8 accumulators of the loop below between zmm16-31 and zmm0-15 around every vpdpbusd
// (16 register moves per 128-byte block, 44 instructions instead of 32).
BITNET_AVX512 static inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The blocks [b0, b1) of one row and one group: the int32 sums sum(c * x) of its 32 columns.
BITNET_AVX512 static inline __attribute__((always_inline)) void vnni_row_chunk(
    const uint8_t* wg, const int8_t* xr, int64_t b0, int64_t b1, __m512i& dot0, __m512i& dot1) {
  const __m512i m0 = _mm512_set1_epi8(3), m1 = _mm512_set1_epi8(12), m2 = _mm512_set1_epi8(48),
                m3 = _mm512_set1_epi8(static_cast<char>(192));
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;  // half 0, codes 0-3
  __m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00;                     // half 1
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* block = wg + b * kBlockBytes;
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64), _MM_HINT_T0);
    const __m512i p0 = _mm512_loadu_si512(block), p1 = _mm512_loadu_si512(block + 64);
    const int8_t* x = xr + b * kBlockK;
    __m512i xb = _mm512_set1_epi32(load4(x));
    a00 = dpbusd(a00, _mm512_and_si512(p0, m0), xb);
    a10 = dpbusd(a10, _mm512_and_si512(p1, m0), xb);
    xb = _mm512_set1_epi32(load4(x + 4));
    a01 = dpbusd(a01, _mm512_and_si512(p0, m1), xb);
    a11 = dpbusd(a11, _mm512_and_si512(p1, m1), xb);
    xb = _mm512_set1_epi32(load4(x + 8));
    a02 = dpbusd(a02, _mm512_and_si512(p0, m2), xb);
    a12 = dpbusd(a12, _mm512_and_si512(p1, m2), xb);
    xb = _mm512_set1_epi32(load4(x + 12));
    a03 = dpbusd(a03, _mm512_and_si512(p0, m3), xb);
    a13 = dpbusd(a13, _mm512_and_si512(p1, m3), xb);
  }
  // acc_i holds 4^i sum(c_i x): exact arithmetic shifts undo the scale.
  dot0 = _mm512_add_epi32(dot0, _mm512_add_epi32(_mm512_add_epi32(a00, _mm512_srai_epi32(a01, 2)),
                                                 _mm512_add_epi32(_mm512_srai_epi32(a02, 4), _mm512_srai_epi32(a03, 6))));
  dot1 = _mm512_add_epi32(dot1, _mm512_add_epi32(_mm512_add_epi32(a10, _mm512_srai_epi32(a11, 2)),
                                                 _mm512_add_epi32(_mm512_srai_epi32(a12, 4), _mm512_srai_epi32(a13, 6))));
}

BITNET_AVX512 static void bitlinear_vnni_row(const BitLinearProblem& p, int64_t m, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  const int8_t* xr = p.xq + m * p.Kp;
  __m512i dot[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t b0 = 0; b0 < nblocks; b0 += kVnniRowChunk)
    vnni_row_chunk(wg, xr, b0, std::min(b0 + kVnniRowChunk, nblocks), dot[0], dot[1]);
  store_group_outputs_vnni(p, m, g, dot);
}

BITNET_AVX512 static void bitlinear_vnni(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  constexpr int MR = 6;  // 6 rows x 2 halves = 12 accumulators + 8 code vectors: fits 32 zmm
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) bitlinear_vnni_tile<MR>(p, m, g);
    switch (m1 - m) {
      case 5: bitlinear_vnni_tile<5>(p, m, g); break;
      case 4: bitlinear_vnni_tile<4>(p, m, g); break;
      case 3: bitlinear_vnni_tile<3>(p, m, g); break;
      case 2: bitlinear_vnni_tile<2>(p, m, g); break;
      case 1: bitlinear_vnni_row(p, m, g); break;
      default: break;
    }
  }
}

// ---- MatMulF16: AVX2 + F16C + FMA, and AVX-512 ------------------------------------------
// Both walk the table one weight row at a time (the whole slice is one sequential stream;
// interleaving rows halved the bandwidth), sharing each loaded row between up to MR rows of x.
// Every output is summed in the same order whatever M is (four accumulators over 4-vector
// steps, the same tail, the same reduction), so a row's logits do not depend on the batch.

constexpr int64_t kF16PrefetchHalves = 1024;  // 2 KiB ahead on the weight stream

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
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kF16PrefetchHalves), _MM_HINT_T0);
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

#define BITNET_AVX512F16 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

template <int MR>
BITNET_AVX512F16 static void matmul_f16_avx512_rows(const MatMulF16Problem& p, int64_t m0, int64_t n) {
  const int64_t K = p.K;
  const uint16_t* w = p.w + n * K;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = p.x + (m0 + m) * K;
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // two 64-byte lines of the weight row
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kF16PrefetchHalves), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kF16PrefetchHalves + 32), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512 wv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16 * i)));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m][i] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[m] + k + 16 * i), wv, acc[m][i]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 keep = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, w + k));
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, xr[m] + k), wv, acc[m][0]);
  }
  for (int m = 0; m < MR; ++m)
    p.y[(m0 + m) * p.N + n] =
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

BITNET_AVX2 static void matmul_f16_avx2(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_f16_avx2_rows<4>, matmul_f16_avx2_rows<3>, matmul_f16_avx2_rows<2>,
                  matmul_f16_avx2_rows<1>>(p, m0, m1, n0, n1);
}

BITNET_AVX512F16 static void matmul_f16_avx512(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_f16_avx512_rows<4>, matmul_f16_avx512_rows<3>, matmul_f16_avx512_rows<2>,
                  matmul_f16_avx512_rows<1>>(p, m0, m1, n0, n1);
}

#endif  // BITNET_X86

// ---- Kernel lists (dispatch.cc picks from them) -------------------------------------------

const KernelChoice<BitLinearKernel>* bitlinear_kernels() {
  static const KernelChoice<BitLinearKernel> list[] = {
#if BITNET_X86
      {"avx512vnni", kFeatAvx2 | kFeatAvx512 | kFeatAvx512Vnni, bitlinear_vnni},
      {"avx2", kFeatAvx2, bitlinear_avx2},
#endif
#if defined(__aarch64__)
      {"dotprod", kFeatNeon | kFeatDotProd, bitlinear_dotprod},
      {"neon", kFeatNeon, bitlinear_neon},
#endif
      {"reference", 0, bitlinear_reference},
  };
  return list;
}

const KernelChoice<MatMulF16Kernel>* matmul_f16_kernels() {
  static const KernelChoice<MatMulF16Kernel> list[] = {
#if BITNET_X86
      {"avx512", kFeatAvx2 | kFeatAvx512, matmul_f16_avx512},
      {"avx2", kFeatAvx2, matmul_f16_avx2},
#endif
#if defined(__aarch64__)
      {"neon", kFeatNeon, matmul_f16_neon},
#endif
      {"reference", 0, matmul_f16_reference},
  };
  return list;
}

}  // namespace bitnet
