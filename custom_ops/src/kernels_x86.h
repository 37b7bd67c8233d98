// x86-64 kernels of the bitnet custom ops (kernels_x86_avx2.cc: AVX2 and AVX-VNNI;
// kernels_x86_avx512.cc: AVX-512 F/BW/VL and AVX-512 VNNI). Each is a twin of its reference in
// kernels_reference.cc; dispatch.cc lists them with the CPU features they need.
//
// MatMulI8's integer products differ by ISA (all exact, so every kernel gives the same bits):
// - AVX2 and AVX-512BW: vpmaddubsw takes u8 x s8, so |w| x (x with w's sign) -- the sign moved
//   onto x. |w| <= 128 and |x| <= 127: a pair of products sums to at most 32512, no int16
//   saturation. vpmaddwd with ones widens to int32.
// - AVX-VNNI and AVX-512 VNNI: vpdpbusd takes u8 x s8 into int32 directly; w ^ 0x80 is the
//   unsigned w + 128, so the sum is (w . x) + 128 * sum(x) and the kernel subtracts the second
//   term (remove_offset, kernels.h).
// Each weight row is loaded once per 32 or 64 bytes and feeds two independent accumulator
// chains (the two terms) per row of x.
#pragma once

#include "kernels.h"

#if BITNET_X86_SIMD

#include <cstdint>

#include <xmmintrin.h>

namespace bitnet {

// Weight streams are prefetched into L2 (prefetcht1) far ahead, not into L1: a request into L1
// holds one of its few fill buffers until the line arrives, which capped the lines in flight.
// Measured from DRAM (bench/kernel_driver.cc, 2560 -> 6912, Intel Xeon with AMX, 2 threads):
// 21 GB/s with prefetcht0 4 KiB ahead, 26 with no software prefetch, 27.5-28.5 with
// prefetcht1 2-4 KiB ahead, against a plain read of 30. The one-row BitLinear kernel also
// pulls lines from L2 into L1 a little ahead (prefetch_near).
inline void prefetch_weights(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
inline void prefetch_near(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

constexpr int64_t kF16PrefetchHalves = 1024;  // MatMulF16: 2 KiB ahead on the weight stream
constexpr int64_t kI8PrefetchBytes = 2048;    // MatMulI8: ahead on the weight stream

void bitlinear_avx2(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
void bitlinear_avx512vnni(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);
void bitlinear_amx(const BitLinearProblem& p, int64_t m0, int64_t m1, int64_t g0, int64_t g1);

void matmul_f16_avx2(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_f16_avx512(const MatMulF16Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

void matmul_i8_avx2(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_i8_avxvnni(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_i8_avx512bw(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_i8_avx512vnni(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
void matmul_i8_amx(const MatMulI8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1);

}  // namespace bitnet

#endif  // BITNET_X86_SIMD
