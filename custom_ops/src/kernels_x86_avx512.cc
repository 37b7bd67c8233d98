// x86 kernels for AVX-512 machines (F/BW/VL: Skylake-SP; with VNNI: Cascade Lake, Ice Lake,
// Sapphire Rapids, Zen 4): BitLinear, MatMulF16 and MatMulI8. Each is a twin of its reference in
// kernels_reference.cc. The library is built for baseline x86-64; these functions carry target
// attributes (compiler.h) and run only when dispatch.cc finds the features.

#include "kernels_x86.h"

#if BITNET_X86_SIMD

#include <algorithm>
#include <cstring>
#include <vector>

#include <immintrin.h>

namespace bitnet {

// ---- BitLinear: AVX-512 VNNI ---------------------------------------------------------------
// A 128-byte block -> 2 halves x 4 code vectors; each vpdpbusd multiplies 16 columns x 4 k
// with the 4 activations broadcast. A tile is MR >= 2 rows x one group (32 columns), sharing
// each unpacked block between the rows; one row (decode) has a kernel of its own below.

// Ahead on the weight stream (kernels_x86.h): into L2 3 KiB ahead, and for one row also into L1
// 1 KiB ahead. One row, 1 thread, from DRAM: 13.3 GB/s with the L2 requests alone, 15.1-15.9
// with both (a plain read: 15.3); 6 KiB + 1.5 KiB ahead fell to 12.8.
constexpr int64_t kPrefetchBytes = 3072;
constexpr int64_t kNearPrefetchBytes = 1024;

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
    prefetch_weights(block + kPrefetchBytes);
    prefetch_weights(block + kPrefetchBytes + 64);
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
    prefetch_weights(block + kPrefetchBytes);
    prefetch_weights(block + kPrefetchBytes + 64);
    prefetch_near(block + kNearPrefetchBytes);
    prefetch_near(block + kNearPrefetchBytes + 64);
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

// ---- BitLinear: AMX-INT8 tiles (Sapphire Rapids and later), for 2 to 32 rows ------------------
// A half block's 64 bytes shifted by 2i and masked are 16 columns x 4 consecutive k: exactly one
// row of an AMX B tile in its VNNI layout. So four blocks (64 k) of a group unpack into two B
// tiles of 16 x 64 codes (one per half), staged in L1; the rows of xq are the A tiles, read in
// place; tdpbssd adds sum(x * c) over the 64 k into C tiles of up to 16 rows x 16 int32 columns.
// Two row tiles share each unpacked chunk, so the weights are unpacked once per 32 rows, and
// one 16 x 16 x 64 tdpbssd replaces 64 vpdpbusd. The sums are exact int32, so the results are
// the VNNI kernel's bits. Below kAmxMinRows rows (decode) the VNNI kernels run: they stream faster.
//
// Tiles: tmm0/tmm1 C of row tile 0 (halves 0/1), tmm2/tmm3 C of row tile 1, tmm4/tmm5 A of row
// tiles 0/1, tmm6/tmm7 B (halves 0/1). With one row tile, tmm2/tmm3 sum the odd chunks: two
// independent chains of tdpbssd instead of one (measured: 1.15x at 16 rows; alternating the A
// and B registers between chunks instead, so loads never wait on products, gained nothing). Written as inline asm with a memory clobber so the
// staging stores are never moved past the tile loads.

namespace {
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
}  // namespace

constexpr int64_t kAmxChunkBlocks = 4;  // 64 k: the depth of one tdpbssd
constexpr int64_t kAmxRows = 16;        // rows of an A or C tile
// Fewer rows run the AVX-512 VNNI kernels. Measured inside ONNX Runtime with the weights coming
// from memory (bench/bench_rows.py, CPU time): at 2 rows the VNNI tiles were 1.2x (BitLinear)
// and 1.3x (MatMulI8) faster, at 4 rows even, from 8 rows on AMX won (1.35x / 1.6x at 8).
constexpr int64_t kAmxMinRows = 4;

// Loads the shape of tmm0-7: rows and bytes per row of each (a tile of 0 rows stays unused).
BITNET_AMX static void amx_load_config(const int (&rows)[8], const int (&colsb)[8]) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = static_cast<uint16_t>(rows[t] ? colsb[t] : 0);
  }
  asm volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}

BITNET_AMX static void amx_configure(int rows0, int rows1) {
  const int c1 = rows1 ? rows1 : rows0;  // tmm2/3: C of row tile 1, or of the odd chunks
  amx_load_config({rows0, rows0, c1, c1, rows0, rows1, kAmxRows, kAmxRows}, {64, 64, 64, 64, 64, 64, 64, 64});
}

// The codes of blocks [b, b + count) of a group as two B tiles (count < 4 leaves zero rows:
// code 0 adds nothing whatever x is).
BITNET_AMX static inline void amx_stage_codes(const uint8_t* blocks, int64_t count, uint8_t (*stage)[kAmxRows][64]) {
  const __m512i mask = _mm512_set1_epi8(3);
  for (int64_t bb = 0; bb < kAmxChunkBlocks; ++bb) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      uint8_t(*rows)[64] = stage[h] + 4 * bb;
      if (bb >= count) {
        for (int i = 0; i < 4; ++i) _mm512_store_si512(rows[i], _mm512_setzero_si512());
        continue;
      }
      const __m512i packed = _mm512_loadu_si512(blocks + bb * kBlockBytes + 64 * h);
      _mm512_store_si512(rows[0], _mm512_and_si512(packed, mask));
      _mm512_store_si512(rows[1], _mm512_and_si512(_mm512_srli_epi16(packed, 2), mask));
      _mm512_store_si512(rows[2], _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask));
      _mm512_store_si512(rows[3], _mm512_and_si512(_mm512_srli_epi16(packed, 6), mask));
    }
  }
}

// Rows [m0, m0 + rows0 + rows1) of one group (rows0 <= 16, rows1 <= 16) with tiles already
// configured for (rows0, rows1). The codes are staged kAmxStages chunks ahead of the tile loads
// that read them: a tile load of lines still in the store buffer stalls (measured: staging
// just before the load ran at a quarter of the decode kernel's rate).
constexpr int64_t kAmxStages = 4;
// The A tiles are 16 rows of x read 64 bytes each at a stride of Kp, which the hardware
// prefetchers do not follow: each row's line two chunks ahead is requested into L1 (2B4T,
// 128-token prefill on 2 threads: 252 -> 245 ms; 8-row decode steps unchanged).
constexpr int64_t kAmxRowPrefetchChunks = 2;

BITNET_AMX static void bitlinear_amx_tile(const BitLinearProblem& p, int64_t m0, int rows0, int rows1, int64_t g) {
  const int64_t nblocks = p.Kp / kBlockK;
  const int64_t nchunks = (nblocks + kAmxChunkBlocks - 1) / kAmxChunkBlocks;
  const uint8_t* wg = p.w + g * nblocks * kBlockBytes;
  alignas(64) uint8_t stage[kAmxStages][2][kAmxRows][64];
  alignas(64) int8_t tail_x[2 * kAmxRows][64];  // the last partial chunk of x, zero padded
  const long stride = static_cast<long>(p.Kp);
  auto stage_chunk = [&](int64_t c) {
    const int64_t b = c * kAmxChunkBlocks;
    amx_stage_codes(wg + b * kBlockBytes, std::min(kAmxChunkBlocks, nblocks - b), stage[c % kAmxStages]);
  };
  for (int64_t c = 0; c < std::min(kAmxStages - 1, nchunks); ++c) stage_chunk(c);
  asm volatile("tilezero %%tmm0\n\ttilezero %%tmm1\n\ttilezero %%tmm2\n\ttilezero %%tmm3" ::: "memory");
  for (int64_t c = 0; c < nchunks; ++c) {
    const uint8_t* ahead = wg + (c * kAmxChunkBlocks) * kBlockBytes + kPrefetchBytes;
    for (int line = 0; line < 8; ++line) prefetch_weights(ahead + 64 * line);
    if (c + kAmxStages - 1 < nchunks) stage_chunk(c + kAmxStages - 1);
    const int64_t b = c * kAmxChunkBlocks, count = std::min(kAmxChunkBlocks, nblocks - b);
    const int8_t* x0 = p.xq + m0 * p.Kp + b * kBlockK;
    long x_stride = stride;
    if (count < kAmxChunkBlocks) {  // A would read past the rows' end: copy the chunk, zero padded
      for (int r = 0; r < rows0 + rows1; ++r) {
        std::memset(tail_x[r], 0, 64);
        std::memcpy(tail_x[r], x0 + r * p.Kp, static_cast<size_t>(count * kBlockK));
      }
      x0 = tail_x[0];
      x_stride = 64;
    }
    const auto& codes = stage[c % kAmxStages];
    if (c + kAmxRowPrefetchChunks < nchunks)  // the rows' next lines into L1 (see kAmxRowPrefetchChunks)
      for (int r = 0; r < rows0 + rows1; ++r) prefetch_near(x0 + r * stride + kAmxRowPrefetchChunks * 64);
    if (rows1) {  // two row tiles: C in tmm0-3, A in tmm4/5, B in tmm6/7
      asm volatile(
          "tileloadd (%0,%1,1), %%tmm6\n\t"
          "tileloadd (%2,%1,1), %%tmm7\n\t"
          "tileloadd (%3,%4,1), %%tmm4\n\t"
          "tileloadd (%5,%4,1), %%tmm5\n\t"
          "tdpbssd %%tmm6, %%tmm4, %%tmm0\n\t"
          "tdpbssd %%tmm7, %%tmm4, %%tmm1\n\t"
          "tdpbssd %%tmm6, %%tmm5, %%tmm2\n\t"
          "tdpbssd %%tmm7, %%tmm5, %%tmm3"
          ::"r"(codes[0]), "r"(64L), "r"(codes[1]), "r"(x0), "r"(x_stride), "r"(x0 + kAmxRows * x_stride)
          : "memory");
    } else {  // one row tile: even chunks into tmm0/1, odd ones into tmm2/3 (two chains of tdpbssd)
      asm volatile("tileloadd (%0,%1,1), %%tmm6\n\ttileloadd (%2,%1,1), %%tmm7\n\ttileloadd (%3,%4,1), %%tmm4"
                   ::"r"(codes[0]), "r"(64L), "r"(codes[1]), "r"(x0), "r"(x_stride) : "memory");
      if (c % 2 == 0)
        asm volatile("tdpbssd %%tmm6, %%tmm4, %%tmm0\n\ttdpbssd %%tmm7, %%tmm4, %%tmm1" ::: "memory");
      else
        asm volatile("tdpbssd %%tmm6, %%tmm4, %%tmm2\n\ttdpbssd %%tmm7, %%tmm4, %%tmm3" ::: "memory");
    }
  }
  alignas(64) int32_t sums[2 * kAmxRows][kGroupCols];  // row r: columns 0-15, then 16-31
  constexpr long kSumStride = sizeof(sums[0]);
  asm volatile("tilestored %%tmm0, (%0,%1,1)\n\ttilestored %%tmm1, (%2,%1,1)\n\t"
               "tilestored %%tmm2, (%3,%1,1)\n\ttilestored %%tmm3, (%4,%1,1)"
               ::"r"(&sums[0][0]), "r"(kSumStride), "r"(&sums[0][kHalfCols]),
                 "r"(&sums[kAmxRows][0]), "r"(&sums[kAmxRows][kHalfCols]) : "memory");
  for (int r = 0; r < rows0 + rows1; ++r) {
    __m512i acc[2] = {_mm512_load_si512(sums[r]), _mm512_load_si512(sums[r] + kHalfCols)};
    if (!rows1) {  // one row tile: add the odd chunks' sums (exact int32)
      acc[0] = _mm512_add_epi32(acc[0], _mm512_load_si512(sums[kAmxRows + r]));
      acc[1] = _mm512_add_epi32(acc[1], _mm512_load_si512(sums[kAmxRows + r] + kHalfCols));
    }
    store_group_outputs_vnni(p, m0 + r, g, acc);
  }
}

BITNET_AMX void bitlinear_amx(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
  if (m1 - m0 < kAmxMinRows) {
    bitlinear_avx512vnni(p, m0, m1, g0, g1);
    return;
  }
  int configured = -1;  // rows0 * 32 + rows1 of the loaded configuration
  for (int64_t m = m0; m < m1; m += 2 * kAmxRows) {
    const int64_t left = m1 - m;
    const int rows0 = static_cast<int>(std::min(left, kAmxRows));
    const int rows1 = static_cast<int>(std::min(left - rows0, kAmxRows));
    if (rows0 * 32 + rows1 != configured) {
      amx_configure(rows0, rows1);
      configured = rows0 * 32 + rows1;
    }
    for (int64_t g = g0; g < g1; ++g) bitlinear_amx_tile(p, m, rows0, rows1, g);
  }
  asm volatile("tilerelease" ::: "memory");  // the thread's tile state back to init: cheap context switches
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
    prefetch_weights(w + k + kF16PrefetchHalves);
    prefetch_weights(w + k + kF16PrefetchHalves + 32);
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
    prefetch_weights(w + k + kI8PrefetchBytes);
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
    prefetch_weights(w + k + kI8PrefetchBytes);
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

// ---- MatMulI8: AMX-INT8 tiles, for 2 to 16 rows of x ---------------------------------------
// Here the weight table is the A operand, read in place: a tile is 16 table rows x 64 bytes of
// k (stride K). The rows of x, both terms, are laid out once per call as B tiles (row r of a
// 64-k chunk holds, for each row m of x, its four values at k = 4r .. 4r+3), so tdpbssd adds
// w[n] . xq[m] for 16 table rows x up to 16 rows of x at once: the instruction's cost depends
// on the table rows, not on M, so a batch reads the table at about the speed of one row.
// Exact int32 sums, so the bits are the other kernels'. Below kAmxMinRows rows the VNNI kernel runs.
//
// Tiles: tmm0/tmm1 C of table tile 0 (xq and rq terms), tmm2/tmm3 C of table tile 1, tmm4/tmm5
// A (table tiles 0/1), tmm6/tmm7 B (the xq and rq terms of the chunk).

BITNET_AMX static void amx_configure_head(int rows0, int rows1, int m) {
  amx_load_config({rows0, rows0, rows1, rows1, rows0, rows1, kAmxRows, kAmxRows},
                  {4 * m, 4 * m, 4 * m, 4 * m, 64, 64, 4 * m, 4 * m});
}

// Rows [m0, m0 + mr) of x (mr <= 16), table rows [n0, n1).
BITNET_AMX static void matmul_i8_amx_rows(const MatMulI8Problem& p, int64_t m0, int mr, int64_t n0, int64_t n1) {
  const int64_t chunks = (p.K + 63) / 64;  // xq rows are padded to a multiple of 64 (kI8PadK)
  // B tiles of both terms: [chunk][term][16 rows][64 bytes], 4 bytes per row of x.
  static thread_local std::vector<int8_t> layout;
  layout.assign(static_cast<size_t>(chunks * 2 * kAmxRows * 64), 0);
  for (int term = 0; term < 2; ++term) {
    const int8_t* q = (term == 0 ? p.xq : p.rq) + m0 * p.Kp;
    for (int m = 0; m < mr; ++m)
      for (int64_t quad = 0; quad < chunks * kAmxRows; ++quad) {
        const int64_t c = quad / kAmxRows, r = quad % kAmxRows;
        std::memcpy(&layout[static_cast<size_t>(((c * 2 + term) * kAmxRows + r) * 64 + 4 * m)], q + m * p.Kp + 4 * quad, 4);
      }
  }
  alignas(64) int8_t tail_w[2 * kAmxRows][64];  // the last partial chunk of the table rows, zero padded
  alignas(64) int32_t sums[4][kAmxRows][kAmxRows];  // [C tile][table row][row of x]
  constexpr long kSumStride = sizeof(sums[0][0]);
  int configured = -1;
  for (int64_t n = n0; n < n1; n += 2 * kAmxRows) {
    const int rows0 = static_cast<int>(std::min<int64_t>(kAmxRows, n1 - n));
    const int rows1 = static_cast<int>(std::min<int64_t>(kAmxRows, n1 - n - rows0));
    if (rows0 * 32 + rows1 != configured) {
      amx_configure_head(rows0, rows1, mr);
      configured = rows0 * 32 + rows1;
    }
    asm volatile("tilezero %%tmm0\n\ttilezero %%tmm1" ::: "memory");
    if (rows1) asm volatile("tilezero %%tmm2\n\ttilezero %%tmm3" ::: "memory");
    const int8_t* w0 = p.w + n * p.K;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = 64 * c;
      const int8_t* a0 = w0 + k;
      long a_stride = static_cast<long>(p.K);
      if (k + 64 > p.K) {  // A would read past the table rows' end: copy, zero padded
        for (int r = 0; r < rows0 + rows1; ++r) {
          std::memset(tail_w[r], 0, 64);
          std::memcpy(tail_w[r], w0 + r * p.K + k, static_cast<size_t>(p.K - k));
        }
        a0 = tail_w[0];
        a_stride = 64;
      } else {
        for (int r = 0; r < rows0 + rows1; ++r)
          prefetch_weights(w0 + r * p.K + k + kI8PrefetchBytes / 2);
      }
      const int8_t* b = &layout[static_cast<size_t>(c * 2 * kAmxRows * 64)];
      asm volatile(
          "tileloadd (%0,%1,1), %%tmm6\n\t"
          "tileloadd (%2,%1,1), %%tmm7\n\t"
          "tileloadd (%3,%4,1), %%tmm4\n\t"
          "tdpbssd %%tmm6, %%tmm4, %%tmm0\n\t"
          "tdpbssd %%tmm7, %%tmm4, %%tmm1"
          ::"r"(b), "r"(64L), "r"(b + kAmxRows * 64), "r"(a0), "r"(a_stride) : "memory");
      if (rows1)
        asm volatile(
            "tileloadd (%0,%1,1), %%tmm5\n\t"
            "tdpbssd %%tmm6, %%tmm5, %%tmm2\n\t"
            "tdpbssd %%tmm7, %%tmm5, %%tmm3"
            ::"r"(a0 + kAmxRows * a_stride), "r"(a_stride) : "memory");
    }
    asm volatile("tilestored %%tmm0, (%0,%1,1)\n\ttilestored %%tmm1, (%2,%1,1)"
                 ::"r"(sums[0]), "r"(kSumStride), "r"(sums[1]) : "memory");
    if (rows1)
      asm volatile("tilestored %%tmm2, (%0,%1,1)\n\ttilestored %%tmm3, (%2,%1,1)"
                   ::"r"(sums[2]), "r"(kSumStride), "r"(sums[3]) : "memory");
    for (int r = 0; r < rows0 + rows1; ++r) {
      const int tile = r < rows0 ? 0 : 2, row = r < rows0 ? r : r - rows0;
      for (int m = 0; m < mr; ++m)
        p.y[(m0 + m) * p.N + n + r] = head_output(p, m0 + m, n + r, sums[tile][row][m], sums[tile + 1][row][m]);
    }
  }
}

BITNET_AMX void matmul_i8_amx(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 < kAmxMinRows) {
    matmul_i8_avx512vnni(p, m0, m1, n0, n1);
    return;
  }
  for (int64_t m = m0; m < m1; m += kAmxRows)
    matmul_i8_amx_rows(p, m, static_cast<int>(std::min(kAmxRows, m1 - m)), n0, n1);
  asm volatile("tilerelease" ::: "memory");
}

}  // namespace bitnet

#endif  // BITNET_X86_SIMD
