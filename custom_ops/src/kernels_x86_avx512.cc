// x86 kernels for AVX-512 machines (F/BW/VL: Skylake-SP; with VNNI: Cascade Lake, Ice Lake,
// Sapphire Rapids, Zen 4): BitLinear, MatMulF16 and MatMulI8. Each is a twin of its reference in
// kernels_reference.cc. The library is built for baseline x86-64; these functions carry target
// attributes (compiler.h) and run only when dispatch.cc finds the features.

#include "kernels_x86.h"

#if BITNET_X86_SIMD

#include <algorithm>

#include <immintrin.h>

namespace bitnet {

// ---- BitLinear: AVX-512 VNNI ---------------------------------------------------------------
// A 128-byte block -> 2 halves x 4 code vectors; each vpdpbusd multiplies 16 columns x 4 k
// with the 4 activations broadcast. A tile is MR >= 2 rows x one group (32 columns), sharing
// each unpacked block between the rows; one row (decode) has a kernel of its own below.

constexpr int64_t kPrefetchBytes = 4096;  // ahead on the weight stream: 1024 left a core 13 % slower
                                          // (the hardware prefetcher alone, at half bandwidth)

// y for one row of a group from its two int32 half accumulators (sum(c * x) per column):
// the same two IEEE operations as bitlinear_output, (dot / s) * S.
BITNET_AVX512VNNI static void store_group_outputs_vnni(const BitLinearProblem& p, int64_t row, int64_t g, const __m512i (&acc)[2]) {
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
BITNET_AVX512VNNI static void bitlinear_vnni_tile(const BitLinearProblem& p, int64_t m0, int64_t g) {
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
BITNET_AVX512VNNI static inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The blocks [b0, b1) of one row and one group: the int32 sums sum(c * x) of its 32 columns.
BITNET_AVX512VNNI static inline __attribute__((always_inline)) void vnni_row_chunk(
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

BITNET_AVX512VNNI static void bitlinear_vnni_row(const BitLinearProblem& p, int64_t m, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  const int8_t* xr = p.xq + m * p.Kp;
  __m512i dot[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t b0 = 0; b0 < nblocks; b0 += kVnniRowChunk)
    vnni_row_chunk(wg, xr, b0, std::min(b0 + kVnniRowChunk, nblocks), dot[0], dot[1]);
  store_group_outputs_vnni(p, m, g, dot);
}

BITNET_AVX512VNNI void bitlinear_avx512vnni(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
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

// ---- MatMulF16: AVX-512 (summation order: see kernels_x86_avx2.cc) -------------------------

template <int MR>
BITNET_AVX512 static void matmul_f16_avx512_rows(const MatMulF16Problem& p, int64_t m0, int64_t n) {
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

BITNET_AVX512 void matmul_f16_avx512(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_f16_avx512_rows<4>, matmul_f16_avx512_rows<3>, matmul_f16_avx512_rows<2>,
                  matmul_f16_avx512_rows<1>>(p, m0, m1, n0, n1);
}

// ---- MatMulI8: AVX-512BW without VNNI (Skylake-SP): |w| x signed x with vpmaddubsw ---------

BITNET_AVX512 static inline __m512i dot64_avx512bw(__m512i acc, __m512i w, __m512i x) {
  const __mmask64 negative = _mm512_movepi8_mask(w);
  const __m512i signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
  const __m512i prod = _mm512_maddubs_epi16(_mm512_abs_epi8(w), signed_x);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(prod, _mm512_set1_epi16(1)));
}

template <int MR>
BITNET_AVX512 static void matmul_i8_avx512bw_rows(const MatMulI8Problem& p, int64_t m0, int64_t n) {
  const int8_t* w = p.w + n * p.K;
  const int8_t* xr[MR][2];
  for (int m = 0; m < MR; ++m) xr[m][0] = p.xq + (m0 + m) * p.Kp, xr[m][1] = p.rq + (m0 + m) * p.Kp;
  __m512i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < p.K; k += 64) {  // q rows are padded to 64, so only w needs a mask
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kI8PrefetchBytes), _MM_HINT_T0);
    const int64_t left = p.K - k;
    const __mmask64 keep = left >= 64 ? ~0ull : (1ull << left) - 1ull;
    const __m512i wv = _mm512_maskz_loadu_epi8(keep, w + k);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < 2; ++t) acc[m][t] = dot64_avx512bw(acc[m][t], wv, _mm512_loadu_si512(xr[m][t] + k));
  }
  for (int m = 0; m < MR; ++m)
    p.y[(m0 + m) * p.N + n] =
        head_output(p, m0 + m, n, _mm512_reduce_add_epi32(acc[m][0]), _mm512_reduce_add_epi32(acc[m][1]));
}

BITNET_AVX512 void matmul_i8_avx512bw(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_avx512bw_rows<4>, matmul_i8_avx512bw_rows<3>, matmul_i8_avx512bw_rows<2>,
                 matmul_i8_avx512bw_rows<1>>(p, m0, m1, n0, n1);
}

// ---- MatMulI8: AVX-512 VNNI ----------------------------------------------------------------

template <int MR>
BITNET_AVX512VNNI static void matmul_i8_vnni_rows(const MatMulI8Problem& p, int64_t m0, int64_t n) {
  const int8_t* w = p.w + n * p.K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* xr[MR][2];
  for (int m = 0; m < MR; ++m) xr[m][0] = p.xq + (m0 + m) * p.Kp, xr[m][1] = p.rq + (m0 + m) * p.Kp;
  __m512i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < p.K; k += 64) {  // masked-off weight bytes become 128 but meet q = 0
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kI8PrefetchBytes), _MM_HINT_T0);
    const int64_t left = p.K - k;
    const __mmask64 keep = left >= 64 ? ~0ull : (1ull << left) - 1ull;
    const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(keep, w + k), flip);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < 2; ++t) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], wu, _mm512_loadu_si512(xr[m][t] + k));
  }
  for (int m = 0; m < MR; ++m) {
    const int64_t row = m0 + m;
    p.y[row * p.N + n] = head_output(p, row, n, remove_offset(_mm512_reduce_add_epi32(acc[m][0]), p.xsum[row]),
                                     remove_offset(_mm512_reduce_add_epi32(acc[m][1]), p.rsum[row]));
  }
}

BITNET_AVX512VNNI void matmul_i8_avx512vnni(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_vnni_rows<4>, matmul_i8_vnni_rows<3>, matmul_i8_vnni_rows<2>, matmul_i8_vnni_rows<1>>(
      p, m0, m1, n0, n1);
}

}  // namespace bitnet

#endif  // BITNET_X86_SIMD
