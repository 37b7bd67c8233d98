// The attention kernel (attention.h). One portable implementation: its loops run over 16
// independent float lanes, which the compiler turns into AVX-512, AVX2 or NEON vectors (on x86
// one clone per level, chosen once when the library loads; NEON is the ARM64 baseline).
// Work is memory-bound at decode: each item streams its chunk of keys and values once for all
// the query heads of its KV head.

#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "compiler.h"
#include "kernels.h"

#if BITNET_X86_SIMD
#include <immintrin.h>
#endif

namespace bitnet {

namespace {

// Everything a cloned entry point calls is inlined into it, so each clone's vector width
// reaches the loops (an out-of-line helper would be compiled for the baseline only).
#if defined(__GNUC__) || defined(__clang__)
#define ATTENTION_INLINE inline __attribute__((always_inline))
#else
#define ATTENTION_INLINE inline
#endif

constexpr int64_t kLanes = 16;
constexpr int64_t kTileKeys = 64;       // scores held per row between the two passes over a tile
constexpr int64_t kBlockQueries = 16;   // prefill: queries per item (times the heads of a group)
// Keys per chunk: fixed, so how a row's keys are cut (and so its bits) never depends on the
// other rows, the batch size, the number of new tokens or the threads.
constexpr int64_t kChunkKeys = 256;
constexpr int64_t kTransposeRows = 16;  // rows from which a tile is transposed (prefill)
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// The one summation order of a score, whichever path computes it: lane l (of 16) sums the
// products at d = l, l + 16, l + 32, ... in that order, then lanes fold in halves (l + 8, l + 4,
// l + 2, l + 1). Decode and prefill, one row or a batch: a query's scores are the same bits.
ATTENTION_INLINE float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  for (int64_t l = 0; d < n; ++d, ++l) lanes[l] += a[d] * b[d];
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// y += a * x over n floats.
ATTENTION_INLINE void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// Max and sum of a tile of kTileKeys floats, in independent lanes first (so they vectorize
// without reassociating a single running value).
ATTENTION_INLINE float lane_max(const float* x) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = x[l];
  for (int64_t j = kLanes; j < kTileKeys; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
  float m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

ATTENTION_INLINE float lane_sum(const float* x) {
  float lanes[kLanes] = {};
  for (int64_t j = 0; j < kTileKeys; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l];
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// exp(x) for x <= 0 (scores minus their running max), relative error below 1e-7 on [-87, 0];
// 0 below. Range reduction to r in [-ln2/2, ln2/2] and a degree-7 Taylor polynomial, written
// with plain float and int operations so the loop over a tile vectorizes without -ffast-math.
ATTENTION_INLINE float exp_nonpositive(float x) {
  // Selections as bit masks, not branches: AVX2 and SSE have no masked float moves.
  const int32_t underflow = -static_cast<int32_t>(x < -87.0f);
  const float floor_value = -87.0f;
  int32_t x_bits, floor_bits;
  std::memcpy(&x_bits, &x, 4);
  std::memcpy(&floor_bits, &floor_value, 4);
  const int32_t clamped_bits = (x_bits & ~underflow) | (floor_bits & underflow);
  float clamped;
  std::memcpy(&clamped, &clamped_bits, 4);
  const float magic = 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  const float n = (clamped * 1.44269504088896341f + magic) - magic;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t two_n_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &two_n_bits, 4);
  const float result = p * two_n;
  int32_t bits;
  std::memcpy(&bits, &result, 4);
  bits &= ~underflow;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Non-interleaved rotary embedding (rotate_half) of one head at one position.
ATTENTION_INLINE void rotate(const float* x, const float* cos, const float* sin, int64_t half, float factor, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = (a * cos[i] - b * sin[i]) * factor;
    out[i + half] = (b * cos[i] + a * sin[i]) * factor;
  }
}

BITNET_TARGET_CLONES("arch=x86-64-v4", "arch=x86-64-v3", "default")
void append_row(const AttentionProblem& p, int64_t b, int64_t s, float* q_rotated) {
  const int64_t D = p.D, half = D / 2, row = b * p.S + s;
  float* qr = q_rotated + row * p.H * D;
  if (s >= p.valid[b]) {  // padding: its query row attends nothing (output zeros)
    std::fill(qr, qr + p.H * D, 0.0f);
    return;
  }
  const int64_t pos = p.past[b] + s;
  const float *cos = p.cos + pos * half, *sin = p.sin + pos * half;
  for (int64_t h = 0; h < p.H; ++h) rotate(p.q + row * p.q_stride + h * D, cos, sin, half, p.scale, qr + h * D);
  std::vector<float> key(static_cast<size_t>(D));
  for (int64_t g = 0; g < p.KV; ++g) {
    const int64_t slot = ((b * p.KV + g) * p.capacity + pos) * D;
    const float* value = p.v + row * p.kv_stride + g * D;
    rotate(p.k + row * p.kv_stride + g * D, cos, sin, half, 1.0f, key.data());
    if (p.half_cache) {
      auto* keys = static_cast<uint16_t*>(p.k_cache) + slot;
      auto* values = static_cast<uint16_t*>(p.v_cache) + slot;
      for (int64_t d = 0; d < D; ++d) {
        keys[d] = float_to_half(key[d]);
        values[d] = float_to_half(value[d]);
      }
    } else {
      std::memcpy(static_cast<float*>(p.k_cache) + slot, key.data(), static_cast<size_t>(D) * sizeof(float));
      std::memcpy(static_cast<float*>(p.v_cache) + slot, value, static_cast<size_t>(D) * sizeof(float));
    }
  }
}

// Widens n halves to floats: the portable loop, and its F16C and AVX-512 twins.
void widen_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

#if BITNET_X86_SIMD
BITNET_AVX2 void widen_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

BITNET_AVX512 void widen_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(src + i + 2048), _MM_HINT_T0);  // 4 KB ahead on the stream
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}
#endif

using WidenFn = void (*)(const uint16_t*, float*, int64_t);

WidenFn widen_for(uint32_t features) {
#if BITNET_X86_SIMD
  if (features & kFeatAvx512) return widen_avx512;
  if (features & kFeatAvx2) return widen_f16c;
#endif
  return widen_portable;
}

// One (row, KV head)'s keys and values, handed out a tile at a time as float32: pointers into
// a float cache, or a half cache's tile widened into scratch.
struct CacheTiles {
  const void *keys, *values;  // the (row, KV head)'s first key / value
  int64_t D;
  WidenFn widen;                    // null: a float cache
  float *key_scratch, *value_scratch;  // [kTileKeys, D] each, for a half cache

  const float* tile(const void* base, float* scratch, int64_t t0, int64_t n) const {
    if (!widen) return static_cast<const float*>(base) + t0 * D;
    widen(static_cast<const uint16_t*>(base) + t0 * D, scratch, n * D);
    return scratch;
  }
  const float* key_tile(int64_t t0, int64_t n) const { return tile(keys, key_scratch, t0, n); }
  const float* value_tile(int64_t t0, int64_t n) const { return tile(values, value_scratch, t0, n); }
};

CacheTiles cache_tiles(const AttentionProblem& p, int64_t b, int64_t g, float* scratch) {
  const int64_t offset = (b * p.KV + g) * p.capacity * p.D, bytes = p.half_cache ? 2 : 4;
  return {static_cast<const char*>(p.k_cache) + offset * bytes, static_cast<const char*>(p.v_cache) + offset * bytes,
          p.D, p.half_cache ? widen_for(p.features) : nullptr, scratch, scratch + kTileKeys * p.D};
}

// One item of step 2: queries [s0, s1) of row b, the `group` query heads of KV head g, keys
// [k0, k1). Writes each (query, head)'s partial: acc = sum p_j v_j, max m, sum l = sum p_j,
// with p_j = exp(score_j - m).
struct AttendItem {
  int64_t b, g, s0, s1, k0, k1;
};

// The rows of an item: query vector and the last key it may see (its own position: causal).
struct QueryRow {
  const float* q;
  float* partial;
  int64_t last_key;
};

// kD: the head size when it is a compile-time constant (64, 128: loops unroll and accumulators
// stay in registers), 0 when it is only known at run time (then d is the run-time D).
template <int kD>
struct Head {
  int64_t D;
  int64_t size() const { return kD ? kD : D; }
};

// Scores of one tile, few rows (decode): each key is read once from memory, then its dot
// product with every row's query comes from L1.
template <int kD>
ATTENTION_INLINE void scores_by_key(Head<kD> head, const QueryRow* rows, int64_t n_rows, const float* key_tile,
                                     int64_t t0, int64_t n, float* scores) {
  const int64_t D = head.size();
  for (int64_t j = 0; j < n; ++j) {
    const float* key = key_tile + j * D;
    for (int64_t r = 0; r < n_rows; ++r)
      scores[r * kTileKeys + j] = t0 + j <= rows[r].last_key ? dot(rows[r].q, key, D) : kMinusInf;
  }
}

// Scores of one tile, many rows (prefill): the tile is transposed once (keys along lanes), so
// each row's scores are broadcast-multiply-adds with no horizontal sums.
template <int kD>
ATTENTION_INLINE void scores_transposed(Head<kD> head, const QueryRow* rows, int64_t n_rows, const float* key_tile,
                                         int64_t t0, int64_t n, float* transposed, float* scores) {
  const int64_t D = head.size();
  for (int64_t j = 0; j < kTileKeys; ++j)
    for (int64_t d = 0; d < D; ++d) transposed[d * kTileKeys + j] = j < n ? key_tile[j * D + d] : 0.0f;
  for (int64_t r = 0; r < n_rows; ++r) {
    float lanes[kLanes][kTileKeys] = {};  // the lanes of dot(), for 64 keys at once
    const float* q = rows[r].q;
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[d];
      const float* column = transposed + d * kTileKeys;
      float* lane = lanes[d % kLanes];
      for (int64_t j = 0; j < kTileKeys; ++j) lane[j] += qd * column[j];
    }
    for (int64_t width = kLanes / 2; width >= 1; width /= 2)
      for (int64_t l = 0; l < width; ++l)
        for (int64_t j = 0; j < kTileKeys; ++j) lanes[l][j] += lanes[l + width][j];
    float* sc = scores + r * kTileKeys;
    for (int64_t j = 0; j < kTileKeys; ++j) sc[j] = t0 + j <= rows[r].last_key ? lanes[0][j] : kMinusInf;
  }
}

// Folds a tile's scores into a row's running softmax: scores become weights exp(s - max), the
// accumulator and sum are rescaled when the max grows. Returns false when nothing is visible.
ATTENTION_INLINE bool softmax_tile(float* sc, int64_t n, float* partial, int64_t D) {
  std::fill(sc + n, sc + kTileKeys, kMinusInf);  // whole tiles: the loops below vectorize
  const float tile_max = lane_max(sc);
  if (tile_max == kMinusInf) return false;
  const float old_max = partial[D], new_max = std::max(old_max, tile_max);
  for (int64_t j = 0; j < kTileKeys; ++j) sc[j] = exp_nonpositive(sc[j] - new_max);
  if (old_max != new_max && old_max != kMinusInf) {
    const float correction = exp_nonpositive(old_max - new_max);
    for (int64_t d = 0; d < D; ++d) partial[d] *= correction;
    partial[D + 1] *= correction;
  }
  partial[D] = new_max;
  partial[D + 1] += lane_sum(sc);
  return true;
}

// partial += weights . the tile's n values, the accumulator held in registers over the tile.
template <int kD>
ATTENTION_INLINE void add_weighted_values(Head<kD> head, const float* weights, const float* value_tile, int64_t n,
                                          float* partial) {
  const int64_t D = head.size();
  if (kD) {
    float acc[kD > 0 ? kD : 1];
    for (int64_t d = 0; d < kD; ++d) acc[d] = partial[d];
    for (int64_t j = 0; j < n; ++j) {
      const float w = weights[j];
      const float* value = value_tile + j * kD;
      for (int64_t d = 0; d < kD; ++d) acc[d] += w * value[d];
    }
    for (int64_t d = 0; d < kD; ++d) partial[d] = acc[d];
    return;
  }
  for (int64_t j = 0; j < n; ++j) axpy(weights[j], value_tile + j * D, partial, D);
}

// Empties the rows' partials; returns the last key of [k0, k1) any row may see (k0 - 1: none).
ATTENTION_INLINE int64_t start_rows(const QueryRow* rows, int64_t n_rows, int64_t D, int64_t k0, int64_t k1) {
  int64_t last_key = k0 - 1;
  for (int64_t r = 0; r < n_rows; ++r) {
    std::fill(rows[r].partial, rows[r].partial + D, 0.0f);
    rows[r].partial[D] = kMinusInf;
    rows[r].partial[D + 1] = 0.0f;
    last_key = std::max(last_key, std::min(k1 - 1, rows[r].last_key));
  }
  return last_key;
}

template <int kD>
ATTENTION_INLINE void attend_rows(Head<kD> head, const QueryRow* rows, int64_t n_rows, const CacheTiles& cache,
                                  int64_t k0, int64_t k1, float* scores, float* transposed) {
  const int64_t D = head.size();
  const int64_t last_key = start_rows(rows, n_rows, D, k0, k1);
  for (int64_t t0 = k0; t0 <= last_key; t0 += kTileKeys) {
    const int64_t n = std::min(kTileKeys, last_key + 1 - t0);
    const float* keys = cache.key_tile(t0, n);
    if (n_rows >= kTransposeRows)
      scores_transposed(head, rows, n_rows, keys, t0, n, transposed, scores);
    else
      scores_by_key(head, rows, n_rows, keys, t0, n, scores);
    const float* values = cache.value_tile(t0, n);
    for (int64_t r = 0; r < n_rows; ++r) {
      float* sc = scores + r * kTileKeys;
      if (softmax_tile(sc, n, rows[r].partial, D)) add_weighted_values(head, sc, values, n, rows[r].partial);
    }
  }
}

BITNET_TARGET_CLONES("arch=x86-64-v4", "arch=x86-64-v3", "default")
void attend_item(const AttentionProblem& p, const AttendItem& it, const QueryRow* rows, int64_t n_rows,
                 float* scores, float* transposed, float* scratch) {
  const CacheTiles cache = cache_tiles(p, it.b, it.g, scratch);
  switch (p.D) {
    case 64: attend_rows(Head<64>{64}, rows, n_rows, cache, it.k0, it.k1, scores, transposed); break;
    case 128: attend_rows(Head<128>{128}, rows, n_rows, cache, it.k0, it.k1, scores, transposed); break;
    default: attend_rows(Head<0>{p.D}, rows, n_rows, cache, it.k0, it.k1, scores, transposed); break;
  }
}

#if BITNET_X86_SIMD
// The AVX-512 twin (D a multiple of 64): keys and values are loaded once per tile for a group
// of rows, and the accumulators stay in registers. Few rows (decode) take dot products per key;
// many rows (prefill) take the tile transposed, keys along the lanes.
// dot()'s fold of 16 lanes: halves, quarters, pairs, then lanes 0 + 1.
BITNET_AVX512 inline float fold_lanes(__m512 a) {
  const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(a),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  __m128 quarters = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
  quarters = _mm_add_ps(quarters, _mm_movehl_ps(quarters, quarters));
  return _mm_cvtss_f32(_mm_add_ss(quarters, _mm_movehdup_ps(quarters)));
}

// Keys ahead of the one being scored whose lines are requested early: a decode step does
// little arithmetic per byte, so without this the loads wait on DRAM (measured 8.7 GB/s on one
// thread over a cold cache, against 17 with plain streaming loads).
constexpr int64_t kPrefetchKeys = 4;

template <int R>
BITNET_AVX512 void scores_by_key_avx512(const QueryRow* rows, const float* key_tile, const float* prefetch_values,
                                        int64_t D, int64_t t0, int64_t n, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    const float* key = key_tile + j * D;
    // The key a few rows on, and this key's value (the pass over values follows this tile;
    // null when the values come widened from a half cache).
    for (int64_t c = 0; c < D; c += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(key + kPrefetchKeys * D + c), _MM_HINT_T0);
      if (prefetch_values) _mm_prefetch(reinterpret_cast<const char*>(prefetch_values + j * D + c), _MM_HINT_T1);
    }
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __m512 k = _mm512_loadu_ps(key + c);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[r].q + c), k, acc[r]);
    }
    for (int r = 0; r < R; ++r)
      scores[r * kTileKeys + j] = t0 + j <= rows[r].last_key ? fold_lanes(acc[r]) : kMinusInf;
  }
}

BITNET_AVX512 void scores_transposed_avx512(const QueryRow* rows, int64_t n_rows, const float* key_tile, int64_t D,
                                            int64_t t0, int64_t n, float* transposed, float* scores) {
  for (int64_t j = 0; j < kTileKeys; ++j)
    for (int64_t d = 0; d < D; ++d) transposed[d * kTileKeys + j] = j < n ? key_tile[j * D + d] : 0.0f;
  static_assert(kTileKeys == 64, "four vectors of keys per row");
  for (int64_t r = 0; r < n_rows; ++r) {
    __m512 lanes[kLanes][4];  // dot()'s lanes, for 64 keys at once
    const float* q = rows[r].q;
    for (int64_t l = 0; l < kLanes; ++l) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t d = l; d < D; d += kLanes) {
        const __m512 qd = _mm512_set1_ps(q[d]);
        for (int i = 0; i < 4; ++i) acc[i] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(transposed + d * kTileKeys + 16 * i), acc[i]);
      }
      for (int i = 0; i < 4; ++i) lanes[l][i] = acc[i];
    }
    for (int64_t width = kLanes / 2; width >= 1; width /= 2)
      for (int64_t l = 0; l < width; ++l)
        for (int i = 0; i < 4; ++i) lanes[l][i] = _mm512_add_ps(lanes[l][i], lanes[l + width][i]);
    float* sc = scores + r * kTileKeys;
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(sc + 16 * i, lanes[0][i]);
    for (int64_t j = 0; j < kTileKeys; ++j)
      if (t0 + j > rows[r].last_key) sc[j] = kMinusInf;
  }
}

// partial += weights . values for R <= 4 rows, 64 floats of D per pass (16 accumulators).
template <int R>
BITNET_AVX512 void add_values_avx512(const QueryRow* rows, const float* value_tile, int64_t D, int64_t n,
                                     const float* weights) {
  for (int64_t c0 = 0; c0 < D; c0 += 64) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_loadu_ps(rows[r].partial + c0 + 16 * i);
    for (int64_t j = 0; j < n; ++j) {
      const float* value = value_tile + j * D + c0;
      __m512 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm512_loadu_ps(value + 16 * i);
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_set1_ps(weights[r * kTileKeys + j]);
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_fmadd_ps(w, v[i], acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(rows[r].partial + c0 + 16 * i, acc[r][i]);
  }
}

BITNET_AVX512 void attend_tile_avx512(const QueryRow* rows, int64_t n_rows, const CacheTiles& cache, int64_t D,
                                      int64_t t0, int64_t n, float* scores, float* transposed) {
  using ScoresFn = void (*)(const QueryRow*, const float*, const float*, int64_t, int64_t, int64_t, float*);
  static constexpr ScoresFn by_key[8] = {scores_by_key_avx512<1>, scores_by_key_avx512<2>, scores_by_key_avx512<3>,
                                         scores_by_key_avx512<4>, scores_by_key_avx512<5>, scores_by_key_avx512<6>,
                                         scores_by_key_avx512<7>, scores_by_key_avx512<8>};
  const float* keys = cache.key_tile(t0, n);
  if (n_rows <= 8)
    by_key[n_rows - 1](rows, keys, cache.widen ? nullptr : static_cast<const float*>(cache.values) + t0 * D, D, t0, n,
                       scores);
  else
    scores_transposed_avx512(rows, n_rows, keys, D, t0, n, transposed, scores);
  for (int64_t r = 0; r < n_rows; ++r) {
    float* sc = scores + r * kTileKeys;
    if (!softmax_tile(sc, n, rows[r].partial, D)) std::fill(sc, sc + n, 0.0f);
  }
  using ValuesFn = void (*)(const QueryRow*, const float*, int64_t, int64_t, const float*);
  static constexpr ValuesFn add_values[4] = {add_values_avx512<1>, add_values_avx512<2>, add_values_avx512<3>,
                                             add_values_avx512<4>};
  const float* values = cache.value_tile(t0, n);
  for (int64_t r = 0; r < n_rows; r += 4)
    add_values[std::min<int64_t>(4, n_rows - r) - 1](rows + r, values, D, n, scores + r * kTileKeys);
}

// Whether the AVX-512 twin takes this head size.
bool avx512_attends(int64_t D) { return D % 64 == 0; }

void attend_item_avx512(const AttentionProblem& p, const AttendItem& it, const QueryRow* rows, int64_t n_rows,
                        float* scores, float* transposed, float* scratch) {
  const CacheTiles cache = cache_tiles(p, it.b, it.g, scratch);
  const int64_t last_key = start_rows(rows, n_rows, p.D, it.k0, it.k1);
  for (int64_t t0 = it.k0; t0 <= last_key; t0 += kTileKeys)
    attend_tile_avx512(rows, n_rows, cache, p.D, t0, std::min(kTileKeys, last_key + 1 - t0), scores, transposed);
}
#else
bool avx512_attends(int64_t) { return false; }
void attend_item_avx512(const AttentionProblem&, const AttendItem&, const QueryRow*, int64_t, float*, float*, float*) {}
#endif

}  // namespace

AttentionRun::AttentionRun(const AttentionProblem& p) : p_(p) {
  block_queries_ = p.S == 1 ? 1 : kBlockQueries;
  query_blocks_ = (p.S + block_queries_ - 1) / block_queries_;
  int64_t most_keys = 1;
  for (int64_t b = 0; b < p.B; ++b) most_keys = std::max<int64_t>(most_keys, keys_of(b));
  chunks_ = (most_keys + kChunkKeys - 1) / kChunkKeys;
  q_rotated_.resize(static_cast<size_t>(p.B * p.S * p.H * p.D));
  partials_.resize(static_cast<size_t>(p.B * p.S * p.H * chunks_ * (p.D + 2)));
}

float* AttentionRun::partial(int64_t b, int64_t s, int64_t h, int64_t chunk) {
  return partials_.data() + (((b * p_.S + s) * p_.H + h) * chunks_ + chunk) * (p_.D + 2);
}

void AttentionRun::append(size_t item) {
  const int64_t i = static_cast<int64_t>(item);
  append_row(p_, i / p_.S, i % p_.S, q_rotated_.data());
}

void AttentionRun::attend(size_t item) {
  int64_t i = static_cast<int64_t>(item);
  const int64_t chunk = i % chunks_;
  i /= chunks_;
  const int64_t block = i % query_blocks_;
  i /= query_blocks_;
  AttendItem it{i / p_.KV, i % p_.KV, block * block_queries_, 0, chunk * kChunkKeys, 0};
  it.s1 = std::min<int64_t>(it.s0 + block_queries_, p_.valid[it.b]);
  it.k1 = std::min<int64_t>(it.k0 + kChunkKeys, keys_of(it.b));
  const int64_t group = p_.H / p_.KV;
  if (it.s0 >= it.s1) return;  // padding queries: merge writes zeros
  std::vector<QueryRow> rows;
  for (int64_t s = it.s0; s < it.s1; ++s)
    for (int64_t h = it.g * group; h < (it.g + 1) * group; ++h)
      rows.push_back({q_rotated_.data() + ((it.b * p_.S + s) * p_.H + h) * p_.D, partial(it.b, s, h, chunk),
                      p_.past[it.b] + s});
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  std::vector<float> scores(rows.size() * kTileKeys);
  std::vector<float> transposed(n_rows >= kTransposeRows || n_rows > 8 ? static_cast<size_t>(p_.D * kTileKeys) : 0);
  std::vector<float> scratch(p_.half_cache ? static_cast<size_t>(2 * kTileKeys * p_.D) : 0);
  if ((p_.features & kFeatAvx512) && avx512_attends(p_.D))
    attend_item_avx512(p_, it, rows.data(), n_rows, scores.data(), transposed.data(), scratch.data());
  else
    attend_item(p_, it, rows.data(), n_rows, scores.data(), transposed.data(), scratch.data());
}

void AttentionRun::merge(size_t item) {
  const int64_t i = static_cast<int64_t>(item), b = i / p_.S, s = i % p_.S, D = p_.D;
  float* out = p_.out + i * p_.H * D;
  for (int64_t h = 0; h < p_.H; ++h, out += D) {
    std::fill(out, out + D, 0.0f);
    if (s >= p_.valid[b]) continue;
    float best = kMinusInf;
    for (int64_t c = 0; c < chunks_; ++c) best = std::max(best, partial(b, s, h, c)[D]);
    float total = 0.0f;
    for (int64_t c = 0; c < chunks_; ++c) {
      const float* part = partial(b, s, h, c);
      if (part[D] == kMinusInf) continue;  // a chunk past this query's position
      const float weight = exp_nonpositive(part[D] - best);
      total += weight * part[D + 1];
      axpy(weight, part, out, D);
    }
    const float inverse = 1.0f / total;
    for (int64_t d = 0; d < D; ++d) out[d] *= inverse;
  }
}

}  // namespace bitnet
