// MatMulI8 kernels (the 8-bit lm_head): one plain C++ reference and its SIMD twins side by side.
//
//   y[m, n] = ((xq[m] . w[n]) / s[m] + (rq[m] . w[n]) / r[m]) * S[n]
//
// x is carried in two int8 terms: xq/s is BitLinear's per-row quantization of x, rq/r the same
// quantization of the residual x - xq/s (about 15 bits of x in all; one term alone lost top-1
// agreement on rows with outlier channels). Both are [M, Kp], |q| <= 127, zero past K. w is
// the int8 table [N, K] shared with the embedding Gather, loaded once for both terms. The int32 dot products are exact (any
// summation order gives the same integer), and the float epilogue is the same two IEEE
// operations in every kernel, so all kernels agree bit for bit and a row's result does not
// depend on M. Each kernel walks weight rows front to back (the table is one stream) and
// reuses a loaded row for up to 4 rows of x.
//
// The integer products differ by ISA:
// - AVX2 and AVX-512BW: vpmaddubsw takes u8 x s8, so |w| x (x with w's sign) — the sign moved
//   onto x. |w| <= 128 and |x| <= 127: a pair of products sums to at most 32512, no int16
//   saturation. vpmaddwd with ones widens to int32.
// - AVX-VNNI and AVX-512 VNNI: vpdpbusd takes u8 x s8 into int32 directly; w ^ 0x80 is the
//   unsigned w + 128, so the sum is (w . x) + 128 * sum(x) and the kernel subtracts the second
//   term (exact modulo 2^32, hence exact whenever the true dot fits in int32).
// Each weight row is loaded once per 64 bytes (a masked load covers the tail) and feeds two
// independent accumulator chains (the two terms) per row of x.

#include <algorithm>
#include <cstring>

#include "kernels.h"

#if BITNET_X86_SIMD
#define BITNET_X86 1
#include <immintrin.h>
#endif

namespace bitnet {

static inline float head_output(const MatMulI8Problem& p, int64_t m, int64_t n, int32_t hi, int32_t lo) {
  return (static_cast<float>(hi) / p.xscale[m] + static_cast<float>(lo) / p.rscale[m]) * p.S[p.per_row_scale ? n : 0];
}

// (dot + 128 * xsum) - 128 * xsum in wrapping int32 arithmetic (no signed-overflow UB).
static inline int32_t remove_offset(int32_t biased, int32_t xsum) {
  return static_cast<int32_t>(static_cast<uint32_t>(biased) - 128u * static_cast<uint32_t>(xsum));
}

// ---- reference -----------------------------------------------------------------------------

static void matmul_i8_reference(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = p.w + n * p.K;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* x = p.xq + m * p.Kp;
      const int8_t* r = p.rq + m * p.Kp;
      int32_t hi = 0, lo = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        hi += static_cast<int32_t>(w[k]) * x[k];
        lo += static_cast<int32_t>(w[k]) * r[k];
      }
      p.y[m * p.N + n] = head_output(p, m, n, hi, lo);
    }
  }
}

#if BITNET_X86

constexpr int64_t kI8PrefetchBytes = 2048;  // ahead on the weight stream

// The last K % 32 (or % 64) bytes of a weight row, zero padded: the vector code then reads no
// byte past the table (xq is zero past K, so the padding adds nothing).
struct TailBuffer {
  alignas(64) int8_t bytes[64];
  TailBuffer(const int8_t* w, int64_t count) {
    std::memset(bytes, 0, sizeof bytes);
    std::memcpy(bytes, w, static_cast<size_t>(count));
  }
};

// ---- AVX2: vpsignb + vpmaddubsw + vpmaddwd ---------------------------------------------------

#define BITNET_AVX2 __attribute__((target("avx2,fma,f16c")))

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
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kI8PrefetchBytes), _MM_HINT_T0);
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

BITNET_AVX2 static void matmul_i8_avx2(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_avx2_rows<4>, matmul_i8_avx2_rows<3>, matmul_i8_avx2_rows<2>, matmul_i8_avx2_rows<1>>(
      p, m0, m1, n0, n1);
}

// ---- AVX-VNNI (256-bit vpdpbusd) -------------------------------------------------------------

#define BITNET_AVXVNNI __attribute__((target("avxvnni,avx2,fma,f16c")))

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
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kI8PrefetchBytes), _MM_HINT_T0);
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

BITNET_AVXVNNI static void matmul_i8_avxvnni(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_avxvnni_rows<4>, matmul_i8_avxvnni_rows<3>, matmul_i8_avxvnni_rows<2>,
                 matmul_i8_avxvnni_rows<1>>(p, m0, m1, n0, n1);
}

// ---- AVX-512BW without VNNI (Skylake-SP): |w| x signed x with vpmaddubsw ------------------

#define BITNET_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

BITNET_AVX512BW static inline __m512i dot64_avx512bw(__m512i acc, __m512i w, __m512i x) {
  const __mmask64 negative = _mm512_movepi8_mask(w);
  const __m512i signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
  const __m512i prod = _mm512_maddubs_epi16(_mm512_abs_epi8(w), signed_x);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(prod, _mm512_set1_epi16(1)));
}

template <int MR>
BITNET_AVX512BW static void matmul_i8_avx512bw_rows(const MatMulI8Problem& p, int64_t m0, int64_t n) {
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

BITNET_AVX512BW static void matmul_i8_avx512bw(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_avx512bw_rows<4>, matmul_i8_avx512bw_rows<3>, matmul_i8_avx512bw_rows<2>,
                 matmul_i8_avx512bw_rows<1>>(p, m0, m1, n0, n1);
}

// ---- AVX-512 VNNI --------------------------------------------------------------------------

#define BITNET_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

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

BITNET_AVX512VNNI static void matmul_i8_vnni(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  walk_row_tiles<matmul_i8_vnni_rows<4>, matmul_i8_vnni_rows<3>, matmul_i8_vnni_rows<2>, matmul_i8_vnni_rows<1>>(
      p, m0, m1, n0, n1);
}

#endif  // BITNET_X86

const KernelChoice<MatMulI8Kernel>* matmul_i8_kernels() {
  static const KernelChoice<MatMulI8Kernel> list[] = {
#if BITNET_X86
      {"avx512vnni", kFeatAvx2 | kFeatAvx512 | kFeatAvx512Vnni, matmul_i8_vnni},
      {"avx512bw", kFeatAvx2 | kFeatAvx512, matmul_i8_avx512bw},
      {"avxvnni", kFeatAvx2 | kFeatAvxVnni, matmul_i8_avxvnni},
      {"avx2", kFeatAvx2, matmul_i8_avx2},
#endif
      {"reference", 0, matmul_i8_reference},
  };
  return list;
}

}  // namespace bitnet
