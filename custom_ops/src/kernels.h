// Kernels of the bitnet custom ops: plain C++ references and their SIMD variants,
// chosen once per session registration from the CPU's features.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "compiler.h"

namespace bitnet {

// ---- BitLinear ---------------------------------------------------------------------------
//
// Packed weight layout (the only producer is custom_ops.pack_ternary in Python):
// output columns n are grouped by 32 and the reduction axis k is padded to Kp, a multiple
// of 16. Each group is one contiguous stream of Kp/16 blocks of 128 bytes, so a whole matrix
// is read front to back as one stream. A block covers the group's 32 columns x 16 values of
// k in two 64-byte halves h (columns 16h .. 16h+15): byte 4*j + t of half h holds four 2-bit
// codes c = w + 1 for column 32*g + 16*h + j at k = 16*b + 4*i + t, code i in bits 2i..2i+1.
// So one 64-byte load, shifted by 2i and masked, is 16 int32 lanes (one per column) of four
// consecutive k: exactly the operand shape of vpdpbusd (u8 codes x s8 activations).
// Since codes are w + 1, sum(c * x) = sum(w * x) + sum(x); kernels subtract sum(x).
constexpr int64_t kGroupCols = 32;   // output columns per group
constexpr int64_t kHalfCols = 16;    // columns per 64-byte half block
constexpr int64_t kBlockK = 16;      // k values per block
constexpr int64_t kBlockBytes = 128;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t packed_bytes(int64_t n, int64_t k) {
  return round_up(n, kGroupCols) * round_up(k, kBlockK) / 4;
}

// One BitLinear call, after activation quantization.
struct BitLinearProblem {
  const int8_t* xq;        // [M, Kp] quantized activations, zero padded past K
  const int32_t* xsum;     // [M] sum of each row of xq
  const float* xscale;     // [M] s = 127 / max|x|; NaN for rows with inf/NaN
  const uint8_t* w;        // packed weights, [N/32 groups][Kp/16 blocks][128]
  const float* S;          // [1] or [N]: output multiplier
  bool per_channel_scale;  // S has N entries
  float* y;                // [M, N]
  int64_t M, N, Kp;
};

// Computes y for rows [m0, m1) and column groups [g0, g1).
using BitLinearKernel = void (*)(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);

// Quantizes rows [m0, m1) of x [M, K] into xq [M, Kp] per the BitNet b1.58 recipe:
// s = 127 / max(max|x|, 1e-5), xq = clamp(round_half_even(x * s), -128, 127).
// A row holding inf or NaN gets xq = 0 and s = NaN, so its outputs are NaN (defined, no UB).
void quantize_rows(const float* x, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                   int8_t* xq, int32_t* xsum, float* xscale);

// The epilogue every BitLinear kernel shares: y = (xq . w) / s * S, two IEEE operations.
// (static: internal linkage, so no unit built for a newer ISA exports a copy the linker could pick)
static inline float bitlinear_output(const BitLinearProblem& p, int64_t m, int64_t n, int32_t dot) {
  return static_cast<float>(dot) / p.xscale[m] * p.S[p.per_channel_scale ? n : 0];
}

// y for one row of a group from the 32 sums sum(c * x) (c = w + 1): subtract sum(x), then the
// shared epilogue (bitlinear_output).
static inline void bitlinear_store_group(const BitLinearProblem& p, int64_t row, int64_t g, const int32_t* sums) {
  for (int64_t c = 0; c < kGroupCols && g * kGroupCols + c < p.N; ++c) {
    const int64_t n = g * kGroupCols + c;
    p.y[row * p.N + n] = bitlinear_output(p, row, n, sums[c] - p.xsum[row]);
  }
}

// Four int8 activations as one int32 (memcpy: no aliasing or alignment assumptions).
static inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- IEEE half precision, in portable code ---------------------------------------------------

// Exact: every half is a float.
static inline float half_to_float(uint16_t h) {
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

// Rounded to nearest, ties to even (numpy's astype(float16), vcvtps2ph); overflow gives inf.
static inline uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf, or NaN (kept quiet, with its top payload bits)
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u | ((abs >> 13) & 0x3ffu) : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504: inf
  if (abs < 0x38800000u) {  // below the smallest normal half: a subnormal (or zero) multiple of 2^-24
    float scaled;
    std::memcpy(&scaled, &abs, 4);
    scaled *= 16777216.0f;  // exact (power of two): units of 2^-24
    const float magic = 12582912.0f;  // 1.5 * 2^23: rounds to the nearest integer, ties to even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>((scaled + magic) - magic));
  }
  // Normal: drop 13 mantissa bits with round-to-nearest-even (a carry may bump the exponent).
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t rounded = rebased + 0x0fffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

// ---- MatMulF16: y[M, N] = x[M, K] @ w[N, K]^T with float16 weights (the tied embedding) ----

struct MatMulF16Problem {
  const float* x;     // [M, K]
  const uint16_t* w;  // [N, K] IEEE half bits
  float* y;           // [M, N]
  int64_t M, N, K;
};
using MatMulF16Kernel = void (*)(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// ---- MatMulI8: the 8-bit lm_head ---------------------------------------------------------
//
// y[m, n] = ((xq[m] . w[n]) / s[m] + (rq[m] . w[n]) / r[m]) * S[n]: x in two int8 terms,
// xq/s = quantize_rows(x) (BitLinear's quantization) and rq/r = quantize_rows(x - xq / s);
// int8 weights [N, K] row-major (the table the embedding Gathers from), one float scale per
// weight row. The int32 sums are exact, so every kernel and every M gives the same bits.
struct MatMulI8Problem {
  const int8_t* xq;      // [M, Kp] first term, zero padded past K
  const int32_t* xsum;   // [M] sum of each row of xq
  const float* xscale;   // [M] s = 127 / max|x|; NaN for rows with inf/NaN
  const int8_t* rq;      // [M, Kp] second term: the residual x - xq / s, quantized
  const int32_t* rsum;   // [M]
  const float* rscale;   // [M]
  const int8_t* w;       // [N, K]
  const float* S;        // [1] or [N]
  bool per_row_scale;    // S has N entries
  float* y;              // [M, N]
  int64_t M, N, K, Kp;
};
constexpr int64_t kI8PadK = 64;  // xq rows are padded to a multiple of this
using MatMulI8Kernel = void (*)(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// The epilogue every MatMulI8 kernel shares, from the two exact int32 dot products.
static inline float head_output(const MatMulI8Problem& p, int64_t m, int64_t n, int32_t hi, int32_t lo) {
  return (static_cast<float>(hi) / p.xscale[m] + static_cast<float>(lo) / p.rscale[m]) * p.S[p.per_row_scale ? n : 0];
}

// vpdpbusd / udot-style kernels see w + 128 (u8): (dot + 128 * xsum) - 128 * xsum in wrapping
// int32 arithmetic (no signed-overflow UB).
static inline int32_t remove_offset(int32_t biased, int32_t xsum) {
  return static_cast<int32_t>(static_cast<uint32_t>(biased) - 128u * static_cast<uint32_t>(xsum));
}

// The head kernels' loop (MatMulF16, MatMulI8): weight rows outermost, each read once from
// memory and then from L1 for the next rows of x, which go in tiles of 4, 3, 2 and 1 rows.
// R4..R1(p, m, n) compute rows m.. of output column n; the tile sizes never change a row's sum.
template <auto R4, auto R3, auto R2, auto R1, class Problem>
inline void walk_row_tiles(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) R4(p, m, n);
    switch (m1 - m) {
      case 3: R3(p, m, n); break;
      case 2: R2(p, m, n); break;
      case 1: R1(p, m, n); break;
      default: break;
    }
  }
}

// ---- GatedReluSquared ----------------------------------------------------------------------

// y[m, k] = relu(x[m, k])^2 * x[m, I + k] for rows [m0, m1) of x [M, 2 I] (gate | up halves).
void gated_relu_squared_rows(const float* x, float* y, int64_t m0, int64_t m1, int64_t I);

// ---- Dispatch (dispatch.cc) --------------------------------------------------------------
//
// Each op lists its kernels best first with the CPU features each needs; the chosen kernel is
// the first whose features the CPU (or the level forced with BITNET_KERNEL) has. Selection is
// a pure function of a feature bitmask, so tests check the whole table on any machine.
enum CpuFeature : uint32_t {
  kFeatAvx2 = 1u << 0,        // AVX2 + FMA + F16C (Haswell, Zen 1 and later)
  kFeatAvx512 = 1u << 1,      // AVX-512 F + BW + VL (Skylake-SP and later, Zen 4)
  kFeatAvx512Vnni = 1u << 2,  // AVX-512 VNNI (Cascade Lake, Ice Lake, Zen 4)
  kFeatAvxVnni = 1u << 3,     // AVX-VNNI, the 256-bit VEX form (Alder Lake, Sapphire Rapids)
  kFeatNeon = 1u << 4,        // ARM64 Advanced SIMD (every ARMv8-A CPU)
  kFeatDotProd = 1u << 5,     // ARM64 sdot/udot (ARMv8.2 FEAT_DotProd: Cortex-A55/A76+, Neoverse, Apple M1+)
  kFeatAmxInt8 = 1u << 6,     // AMX tiles + int8 (Sapphire Rapids and later), the OS letting this process use them
};

template <typename Fn>
struct KernelChoice {
  const char* name;
  uint32_t needs;  // CpuFeature bits
  Fn fn;
};

// The portable reference kernels (kernels_reference.cc): every SIMD kernel's twin, and what
// runs where no SIMD kernel applies. The SIMD kernels are declared per architecture in
// kernels_x86.h and kernels_arm.h; dispatch.cc lists them all.
void bitlinear_reference(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
void matmul_f16_reference(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_i8_reference(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

// Each op's kernels, best first, ending with the reference (needs nothing).
const KernelChoice<BitLinearKernel>* bitlinear_kernels();
const KernelChoice<MatMulF16Kernel>* matmul_f16_kernels();
const KernelChoice<MatMulI8Kernel>* matmul_i8_kernels();

struct KernelSet {
  const char* name;  // the level: reference, avx2, avxvnni, avx512, avx512vnni, amx, neon or dotprod
  BitLinearKernel bitlinear;
  const char* bitlinear_name;
  MatMulF16Kernel matmul_f16;
  const char* matmul_f16_name;
  MatMulI8Kernel matmul_i8;
  const char* matmul_i8_name;
  uint32_t features;  // the CpuFeature bits the set was chosen for (attention.cc picks its twin)
};

uint32_t cpu_features();                          // this CPU's CpuFeature bits
KernelSet kernels_for_features(uint32_t features);  // pure: each op's best kernel for these features

// The kernel set named by BITNET_KERNEL (reference|avx2|avxvnni|avx512|avx512vnni|amx|neon|dotprod|auto,
// default auto: the best this CPU runs). Returns false with a message when the name is
// unknown or the CPU lacks the instructions (the message names them).
bool select_kernels(const char* requested, KernelSet* out, std::string* error);

}  // namespace bitnet
