// The portable reference kernels of the bitnet custom ops, one per op, and the activation
// quantization every kernel shares (so their inputs are identical). Each SIMD kernel
// (kernels_x86_*.cc, kernels_arm*.cc) is a twin of one of these: BitLinear and MatMulI8 give
// the same bits (their int32 dot products are exact and the float epilogue is the same two
// IEEE operations everywhere); MatMulF16 kernels each keep one summation order for every M.

#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels.h"

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
    // |x * s| <= 127 (+1 ulp), so the rounded value fits int32 and the clamp (a safety net)
    // can be done on integers, which vectorizes without float compare-and-blend sequences.
    for (int64_t k = 0; k < K; ++k) {
      const int32_t q = std::min(std::max(static_cast<int32_t>(round_half_even(xr[k] * s)), -128), 127);
      qr[k] = static_cast<int8_t>(q);
      sum += q;
    }
    for (int64_t k = K; k < Kp; ++k) qr[k] = 0;
    xsum[m] = sum;
    xscale[m] = s;
  }
}

// ---- BitLinear: reference ------------------------------------------------------------------

void bitlinear_reference(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1) {
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

// ---- GatedReluSquared ----------------------------------------------------------------------

BITNET_TARGET_CLONES("avx512f", "avx2", "default")
void gated_relu_squared_rows(const float* x, float* y, int64_t m0, int64_t m1, int64_t I) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* __restrict gate = x + m * 2 * I;
    const float* __restrict up = gate + I;
    float* __restrict out = y + m * I;
    for (int64_t k = 0; k < I; ++k) {
      const float r = gate[k] > 0.0f ? gate[k] : 0.0f;
      out[k] = (r * r) * up[k];
    }
  }
}

// ---- MatMulF16: reference ------------------------------------------------------------------

void matmul_f16_reference(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
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

// ---- MatMulI8: reference ------------------------------------------------------------------

void matmul_i8_reference(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
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

}  // namespace bitnet
