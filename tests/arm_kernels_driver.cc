// Test driver for the ARM64 kernels (built with the aarch64 cross compiler, run under
// qemu-aarch64 by tests/test_arm_kernels.py): checks every ARM kernel this CPU runs against
// the reference kernel of custom_ops/src/kernels_reference.cc through the real dispatch tables.
//
//   arm_kernels_driver --expect-dotprod 0|1
//
// BitLinear: bit for bit (memcmp) against the reference, at the 2B4T shapes, odd K and N,
// M = 1..9 and 128, with the work split into row x group ranges the way ops.cc splits it.
// MatMulI8: bit for bit against the reference (exact integer sums), whole and split.
// MatMulF16: the NEON kernel has its own fixed summation order (like the x86 kernels), so it
// is checked bit for bit against a scalar model of that order, for batch invariance (a row's
// result does not depend on M), and against the reference within a float32 error bound.
// GroupQueryAttention (attention.cc, NEON through the compiler): against a float64 model of the
// definition computed here, with float32 and float16 caches, and decode one token at a time
// against one prefill of the same tokens, bit for bit.
// Prints one line per check; exit status 0 only if every check passed.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "kernels.h"

using namespace bitnet;

static int failures = 0;

static void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// ---- BitLinear -----------------------------------------------------------------------------

// pack_ternary of custom_ops/__init__.py, in C++: codes w + 1, padding code 1 (w = 0).
static std::vector<uint8_t> pack(const std::vector<int8_t>& w, int64_t N, int64_t K) {
  const int64_t Kp = round_up(K, kBlockK), groups = round_up(N, kGroupCols) / kGroupCols;
  std::vector<uint8_t> packed(static_cast<size_t>(packed_bytes(N, K)), 0);
  for (int64_t n = 0; n < groups * kGroupCols; ++n) {
    for (int64_t k = 0; k < Kp; ++k) {
      const int code = (n < N && k < K) ? w[n * K + k] + 1 : 1;
      const int64_t g = n / kGroupCols, c = n % kGroupCols, b = k / kBlockK, i = (k % kBlockK) / 4, t = k % 4;
      const int64_t byte = g * (Kp / kBlockK) * kBlockBytes + b * kBlockBytes + (c / kHalfCols) * 64 + (c % kHalfCols) * 4 + t;
      packed[byte] |= static_cast<uint8_t>(code << (2 * i));
    }
  }
  return packed;
}

struct BitLinearCase {
  int64_t M, N, K, Kp;
  std::vector<uint8_t> w;
  std::vector<float> S;
  std::vector<int8_t> xq;
  std::vector<int32_t> xsum;
  std::vector<float> xscale;

  BitLinearCase(int64_t m, int64_t k, int64_t n, bool per_channel, uint32_t seed) : M(m), N(n), K(k), Kp(round_up(k, kBlockK)) {
    std::mt19937 rng(seed);
    std::vector<int8_t> tern(static_cast<size_t>(N * K));
    for (auto& v : tern) v = static_cast<int8_t>(static_cast<int>(rng() % 3) - 1);
    w = pack(tern, N, K);
    std::uniform_real_distribution<float> unit(0.5f, 1.5f);
    S.resize(per_channel ? N : 1);
    for (auto& s : S) s = unit(rng);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> x(static_cast<size_t>(M * K));
    for (auto& v : x) v = normal(rng);
    if (M >= 3) {  // extreme rows: all at +-max (int8 sums at their bounds), and one with inf
      for (int64_t k2 = 0; k2 < K; ++k2) x[1 * K + k2] = (k2 % 2) ? -7.0f : 7.0f;
      x[2 * K + K / 2] = INFINITY;
    }
    xq.resize(static_cast<size_t>(M * Kp));
    xsum.resize(M);
    xscale.resize(M);
    quantize_rows(x.data(), K, Kp, 0, M, xq.data(), xsum.data(), xscale.data());
  }

  // y from `kernel`, the work split into row blocks of `rows` and column groups of `groups`.
  std::vector<float> run(BitLinearKernel kernel, int64_t rows, int64_t groups) const {
    std::vector<float> y(static_cast<size_t>(M * N), -1.0f);
    BitLinearProblem p{xq.data(), xsum.data(), xscale.data(), w.data(), S.data(), S.size() > 1, y.data(), M, N, Kp};
    const int64_t G = round_up(N, kGroupCols) / kGroupCols;
    for (int64_t g0 = 0; g0 < G; g0 += groups)
      for (int64_t m0 = 0; m0 < M; m0 += rows) kernel(p, m0, std::min(m0 + rows, M), g0, std::min(g0 + groups, G));
    return y;
  }
};

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

static void check_bitlinear(const KernelSet& ref, const std::vector<KernelSet>& arm, int64_t M, int64_t K, int64_t N) {
  const BitLinearCase c(M, K, N, (M + N) % 2 == 1, static_cast<uint32_t>(M * 7919 + K * 31 + N));
  const std::vector<float> expected = c.run(ref.bitlinear, M, 1 << 20);
  for (const KernelSet& k : arm) {
    const bool whole = same_bits(c.run(k.bitlinear, M, 1 << 20), expected);
    const bool split = same_bits(c.run(k.bitlinear, 3, 2), expected);  // odd row blocks, 2-group items
    check(whole && split, std::string("BitLinear ") + k.bitlinear_name + " == reference bit for bit: M=" +
                              std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
  }
}

// ---- MatMulF16 -----------------------------------------------------------------------------

static float half_bits_to_float(uint16_t h) {  // exact, independent of the kernels' converter
  const int sign = (h >> 15) ? -1 : 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -24);
  return sign * std::ldexp(static_cast<float>(mant | 0x400), exp - 25);
}

// The NEON kernel's summation order, in scalar code: lanes l of four accumulators a over
// 16-value steps (fused multiply-add), 4-value steps into a[0], (a0 + a1) + (a2 + a3), the
// lanes pairwise ((l0 + l1) + (l2 + l3)), then the tail one by one (multiply, then add).
static float matmul_f16_neon_model(const float* x, const uint16_t* w, int64_t K) {
  float a[4][4] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int i = 0; i < 4; ++i)
      for (int l = 0; l < 4; ++l) a[i][l] = std::fma(x[k + 4 * i + l], half_bits_to_float(w[k + 4 * i + l]), a[i][l]);
  for (; k + 4 <= K; k += 4)
    for (int l = 0; l < 4; ++l) a[0][l] = std::fma(x[k + l], half_bits_to_float(w[k + l]), a[0][l]);
  float v[4];
  for (int l = 0; l < 4; ++l) v[l] = (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]);
  float s = (v[0] + v[1]) + (v[2] + v[3]);
  for (; k < K; ++k) {
    const float prod = x[k] * half_bits_to_float(w[k]);
    s += prod;
  }
  return s;
}

static void check_matmul_f16(const KernelSet& ref, const KernelSet& arm, int64_t M, int64_t K, int64_t N) {
  std::mt19937 rng(static_cast<uint32_t>(M * 131 + K * 17 + N));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(M * K));
  for (auto& v : x) v = normal(rng);
  std::vector<uint16_t> w(static_cast<size_t>(N * K));
  for (auto& h : w) {
    const uint32_t r = rng();
    // mostly normal halves of magnitude < 2, some subnormals and zeros of both signs
    h = static_cast<uint16_t>((r % 16 == 0) ? (r >> 8) & 0x83ff : ((r >> 8) & 0x8000) | (((r >> 16) % 16 + 1) << 10) | ((r >> 4) & 0x3ff));
  }
  auto run = [&](MatMulF16Kernel kernel, int64_t rows, int64_t cols) {
    std::vector<float> y(static_cast<size_t>(M * N), -1.0f);
    MatMulF16Problem p{x.data(), w.data(), y.data(), M, N, K};
    for (int64_t n0 = 0; n0 < N; n0 += cols)
      for (int64_t m0 = 0; m0 < M; m0 += rows) kernel(p, m0, std::min(m0 + rows, M), n0, std::min(n0 + cols, N));
    return y;
  };
  const std::vector<float> got = run(arm.matmul_f16, M, N), split = run(arm.matmul_f16, 3, 5);
  const std::vector<float> expected = run(ref.matmul_f16, M, N);
  bool model_ok = true, invariant_ok = true, close_ok = true;
  for (int64_t m = 0; m < M; ++m) {
    std::vector<float> one(static_cast<size_t>(N));  // row m alone (M = 1), as in decode
    MatMulF16Problem p1{x.data() + m * K, w.data(), one.data(), 1, N, K};
    arm.matmul_f16(p1, 0, 1, 0, N);
    for (int64_t n = 0; n < N; ++n) {
      const float y = got[m * N + n];
      const float model = matmul_f16_neon_model(x.data() + m * K, w.data() + n * K, K);
      model_ok &= std::memcmp(&y, &model, 4) == 0;
      invariant_ok &= std::memcmp(&y, &one[n], 4) == 0 && std::memcmp(&y, &split[m * N + n], 4) == 0;
      double bound = 0;  // float32 summation error bound: K * eps * sum |x w|
      for (int64_t k = 0; k < K; ++k) bound += std::fabs(x[m * K + k] * half_bits_to_float(w[n * K + k]));
      close_ok &= std::fabs(static_cast<double>(y) - expected[m * N + n]) <= 2.0 * K * 6e-8 * bound + 1e-30;
    }
  }
  const std::string shape = ": M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N);
  check(model_ok, std::string("MatMulF16 ") + arm.matmul_f16_name + " == scalar model of its order bit for bit" + shape);
  check(invariant_ok, std::string("MatMulF16 ") + arm.matmul_f16_name + " rows independent of M and of the split" + shape);
  check(close_ok, std::string("MatMulF16 ") + arm.matmul_f16_name + " within float32 error of the reference" + shape);
}

// ---- MatMulI8 ------------------------------------------------------------------------------

// Bit for bit against the reference, whole and split into odd row blocks and column slices,
// with |w| = 128 and |x| = 127 entries (the int16 pair sums at their bound).
static void check_matmul_i8(const KernelSet& ref, const KernelSet& arm, int64_t M, int64_t K, int64_t N) {
  std::mt19937 rng(static_cast<uint32_t>(M * 257 + K * 13 + N));
  const int64_t Kp = round_up(K, kI8PadK);
  std::vector<int8_t> w(static_cast<size_t>(N * K));
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int8_t>(i % 7 == 0 ? -128 : static_cast<int>(rng() % 256) - 128);
  std::vector<float> S(static_cast<size_t>(N));
  for (auto& s : S) s = 0.25f + static_cast<float>(rng() % 1000) / 1000.0f;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(static_cast<size_t>(M * K)), residual(static_cast<size_t>(M * K));
  for (auto& v : x) v = normal(rng);
  if (M >= 2) for (int64_t k = 0; k < K; ++k) x[K + k] = -1.0f;  // every xq = -127
  std::vector<int8_t> q(static_cast<size_t>(2 * M * Kp));
  std::vector<int32_t> sums(static_cast<size_t>(2 * M));
  std::vector<float> scales(static_cast<size_t>(2 * M));
  quantize_rows(x.data(), K, Kp, 0, M, q.data(), sums.data(), scales.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) residual[m * K + k] = x[m * K + k] - static_cast<float>(q[m * Kp + k]) / scales[m];
  quantize_rows(residual.data(), K, Kp, 0, M, q.data() + M * Kp, sums.data() + M, scales.data() + M);
  auto run = [&](MatMulI8Kernel kernel, int64_t rows, int64_t cols) {
    std::vector<float> y(static_cast<size_t>(M * N), -1.0f);
    MatMulI8Problem p{q.data(), sums.data(), scales.data(), q.data() + M * Kp, sums.data() + M, scales.data() + M,
                      w.data(), S.data(), true, y.data(), M, N, K, Kp};
    for (int64_t n0 = 0; n0 < N; n0 += cols)
      for (int64_t m0 = 0; m0 < M; m0 += rows) kernel(p, m0, std::min(m0 + rows, M), n0, std::min(n0 + cols, N));
    return y;
  };
  const std::vector<float> expected = run(ref.matmul_i8, M, N);
  const bool ok = same_bits(run(arm.matmul_i8, M, N), expected) && same_bits(run(arm.matmul_i8, 3, 5), expected);
  check(ok, std::string("MatMulI8 ") + arm.matmul_i8_name + " == reference bit for bit: M=" + std::to_string(M) +
                " K=" + std::to_string(K) + " N=" + std::to_string(N));
}

// ---- GroupQueryAttention --------------------------------------------------------------------

struct AttentionCase {
  int64_t H = 8, KV = 2, D = 64, past, capacity;
  bool half;
  std::vector<float> qkv, cos, sin;     // new tokens [S_total, (H + 2 KV) D]; tables [capacity, D / 2]
  std::vector<float> k_f32, v_f32;      // float cache [KV, capacity, D]
  std::vector<uint16_t> k_f16, v_f16;   // half cache

  AttentionCase(int64_t past_tokens, int64_t new_tokens, bool half_cache, uint32_t seed)
      : past(past_tokens), capacity(past_tokens + new_tokens), half(half_cache) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    qkv.resize(static_cast<size_t>(new_tokens * (H + 2 * KV) * D));
    for (auto& v : qkv) v = normal(rng);
    cos.resize(static_cast<size_t>(capacity * D / 2));
    sin.resize(cos.size());
    for (int64_t p = 0; p < capacity; ++p)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double angle = static_cast<double>(p) / std::pow(10000.0, 2.0 * static_cast<double>(i) / static_cast<double>(D));
        cos[p * D / 2 + i] = static_cast<float>(std::cos(angle));
        sin[p * D / 2 + i] = static_cast<float>(std::sin(angle));
      }
    k_f32.resize(static_cast<size_t>(KV * capacity * D));
    v_f32.resize(k_f32.size());
    for (auto& v : k_f32) v = normal(rng);
    for (auto& v : v_f32) v = normal(rng);
    k_f16.resize(k_f32.size());
    v_f16.resize(v_f32.size());
    for (size_t i = 0; i < k_f32.size(); ++i) {
      k_f16[i] = float_to_half(k_f32[i]);
      v_f16[i] = float_to_half(v_f32[i]);
    }
  }

  // Runs tokens [first, first + S) of qkv on top of `cached` tokens; returns the output [S, H D].
  std::vector<float> run(uint32_t features, int64_t cached, int64_t first, int64_t S) {
    AttentionProblem p{};
    const int64_t stride = (H + 2 * KV) * D;
    p.q = qkv.data() + first * stride;
    p.k = p.q + H * D;
    p.v = p.q + (H + KV) * D;
    p.q_stride = p.kv_stride = stride;
    p.k_cache = half ? static_cast<void*>(k_f16.data()) : static_cast<void*>(k_f32.data());
    p.v_cache = half ? static_cast<void*>(v_f16.data()) : static_cast<void*>(v_f32.data());
    const int32_t past_tokens = static_cast<int32_t>(cached), valid = static_cast<int32_t>(S);
    p.past = &past_tokens;
    p.valid = &valid;
    p.cos = cos.data();
    p.sin = sin.data();
    std::vector<float> out(static_cast<size_t>(S * H * D));
    p.out = out.data();
    p.B = 1;
    p.S = S;
    p.H = H;
    p.KV = KV;
    p.D = D;
    p.capacity = capacity;
    p.scale = 1.0f / std::sqrt(static_cast<float>(D));
    p.half_cache = half;
    p.features = features;
    AttentionRun attention(p);
    for (size_t i = 0; i < attention.append_items(); ++i) attention.append(i);
    for (size_t i = 0; i < attention.attend_items(); ++i) attention.attend(i);
    for (size_t i = 0; i < attention.merge_items(); ++i) attention.merge(i);
    return out;
  }

  double cached(const std::vector<float>& f, const std::vector<uint16_t>& h, int64_t g, int64_t pos, int64_t d) const {
    const size_t i = static_cast<size_t>((g * capacity + pos) * D + d);
    return half ? half_to_float(h[i]) : f[i];
  }

  // The largest |difference| from a float64 model over the cache as it now holds the keys and
  // values (so the model checks the attention, not the storage rounding), for tokens [first, first + S).
  double max_error(const std::vector<float>& out, int64_t first, int64_t S) const {
    const int64_t stride = (H + 2 * KV) * D, half_d = D / 2;
    double worst = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t pos = past + first + s;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / (H / KV);
        std::vector<double> q(static_cast<size_t>(D));
        const float* x = qkv.data() + (first + s) * stride + h * D;
        for (int64_t i = 0; i < half_d; ++i) {
          const double c = cos[pos * half_d + i], sn = sin[pos * half_d + i];
          q[i] = x[i] * c - x[i + half_d] * sn;
          q[i + half_d] = x[i + half_d] * c + x[i] * sn;
        }
        std::vector<double> scores(static_cast<size_t>(pos + 1));
        double best = -1e300;
        for (int64_t j = 0; j <= pos; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * cached(k_f32, k_f16, g, j, d);
          scores[j] = dot / std::sqrt(static_cast<double>(D));
          best = std::max(best, scores[j]);
        }
        double total = 0.0;
        for (auto& v : scores) total += (v = std::exp(v - best));
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int64_t j = 0; j <= pos; ++j) acc += scores[j] * cached(v_f32, v_f16, g, j, d);
          worst = std::max(worst, std::fabs(acc / total - out[(s * H + h) * D + d]));
        }
      }
    }
    return worst;
  }
};

static void check_attention(uint32_t features, int64_t past, int64_t S, bool half) {
  const std::string label = std::string("GroupQueryAttention ") + (half ? "float16" : "float32") +
                            " cache: past=" + std::to_string(past) + " S=" + std::to_string(S);
  AttentionCase prefill(past, S, half, static_cast<uint32_t>(past * 31 + S)), decode = prefill;
  const std::vector<float> at_once = prefill.run(features, past, 0, S);
  check(prefill.max_error(at_once, 0, S) < 1e-4, label + " matches a float64 model");
  std::vector<float> one_by_one;
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<float> step = decode.run(features, past + s, s, 1);
    one_by_one.insert(one_by_one.end(), step.begin(), step.end());
  }
  check(same_bits(one_by_one, at_once), label + " decoded one token at a time == one prefill, bit for bit");
}

// ---- main ----------------------------------------------------------------------------------

int main(int argc, char** argv) {
  int expect_dotprod = -1;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--expect-dotprod" && i + 1 < argc) expect_dotprod = std::atoi(argv[++i]);
  }
  if (expect_dotprod < 0) {
    std::fprintf(stderr, "usage: %s --expect-dotprod 0|1\n", argv[0]);
    return 2;
  }

  // The dispatch: what HWCAP says, what auto picks, what forcing each level does.
  const uint32_t features = cpu_features();
  const bool dotprod = (features & kFeatDotProd) != 0;
  check((features & kFeatNeon) != 0, "cpu_features() has NEON");
  check(dotprod == (expect_dotprod == 1), std::string("cpu_features() ") + (dotprod ? "has" : "lacks") + " the dot product (HWCAP_ASIMDDP)");
  KernelSet autoset{}, forced{};
  std::string error;
  check(select_kernels("auto", &autoset, &error) && std::string(autoset.name) == (dotprod ? "dotprod" : "neon"),
        std::string("auto picks ") + autoset.name);
  check(std::string(autoset.bitlinear_name) == (dotprod ? "dotprod" : "neon") &&
            std::string(autoset.matmul_f16_name) == "neon",
        std::string("auto: BitLinear ") + autoset.bitlinear_name + ", MatMulF16 " + autoset.matmul_f16_name);
  check(select_kernels("neon", &forced, &error) && std::string(forced.bitlinear_name) == "neon", "BITNET_KERNEL=neon runs the NEON BitLinear");
  error.clear();
  const bool forced_dot = select_kernels("dotprod", &forced, &error);
  check(dotprod ? forced_dot : (!forced_dot && error.find("lacks") != std::string::npos),
        "BITNET_KERNEL=dotprod " + std::string(forced_dot ? "accepted" : "refused: " + error));
  error.clear();
  check(!select_kernels("avx2", &forced, &error) && error.find("lacks") != std::string::npos, "BITNET_KERNEL=avx2 refused: " + error);

  const KernelSet ref = kernels_for_features(0);
  std::vector<KernelSet> arm = {kernels_for_features(kFeatNeon)};
  if (dotprod) arm.push_back(kernels_for_features(kFeatNeon | kFeatDotProd));
  check(std::string(ref.bitlinear_name) == "reference" && std::string(arm[0].bitlinear_name) == "neon" &&
            (!dotprod || std::string(arm[1].bitlinear_name) == "dotprod"),
        "kernel table: reference / neon / dotprod");

  // BitLinear: the 2B4T shapes (K, N), odd K and N, M = 1..9 and 128.
  const int64_t shapes_2b4t[][2] = {{2560, 2560}, {2560, 640}, {2560, 6912}, {6912, 2560}};
  for (const auto& s : shapes_2b4t)
    for (int64_t M : {int64_t{1}, int64_t{2}}) check_bitlinear(ref, arm, M, s[0], s[1]);
  for (int64_t M = 3; M <= 9; ++M) check_bitlinear(ref, arm, M, 2560, 640);
  check_bitlinear(ref, arm, 128, 2560, 640);
  const int64_t odd[][2] = {{33, 17}, {80, 161}, {37, 1}, {255, 95}, {16, 32}};
  for (const auto& s : odd)
    for (int64_t M = 1; M <= 9; ++M) check_bitlinear(ref, arm, M, s[0], s[1]);
  check_bitlinear(ref, arm, 128, 272, 96);
  check_bitlinear(ref, arm, 128, 37, 33);

  // MatMulF16 (same NEON kernel at both levels): 2B4T's K, odd K, M = 1..9 and 128.
  for (int64_t M = 1; M <= 9; ++M) check_matmul_f16(ref, arm[0], M, 37, 7);
  check_matmul_f16(ref, arm[0], 1, 2560, 64);
  check_matmul_f16(ref, arm[0], 5, 2563, 9);
  check_matmul_f16(ref, arm[0], 128, 67, 5);

  // MatMulI8 (same NEON kernel at both levels): 2B4T's K, odd K and N, M = 1..9 and 33.
  check(std::string(arm[0].matmul_i8_name) == "neon", std::string("kernel table: MatMulI8 ") + arm[0].matmul_i8_name);
  for (int64_t M = 1; M <= 9; ++M) check_matmul_i8(ref, arm[0], M, 37, 7);
  check_matmul_i8(ref, arm[0], 1, 2560, 64);
  check_matmul_i8(ref, arm[0], 4, 2563, 9);
  check_matmul_i8(ref, arm[0], 33, 67, 5);

  // GroupQueryAttention: decode-sized and prefill-sized items, across a 256-key chunk boundary.
  for (bool half : {false, true}) {
    check_attention(features, 0, 5, half);
    check_attention(features, 300, 3, half);
    check_attention(features, 40, 20, half);
  }

  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
