// The x86 twins of the attention kernel (attention.cc): the AVX-512 item and the F16C / AVX-512
// widening of half-precision cache tiles. Each gives the portable version's bits for a score
// (attention_tiles.h: one summation order), so decode, prefill and batches agree.

#include "attention_tiles.h"
#include "kernels.h"

#if BITNET_X86_SIMD
#include <immintrin.h>

namespace bitnet {

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

// The AVX-512 twin (D a multiple of 64): keys and values are loaded once per tile for a group
// of rows, and the accumulators stay in registers. Few rows (decode) take dot products per key;
// many rows (prefill) take the tile transposed, keys along the lanes.

// dot()'s fold of 16 lanes: halves, quarters, pairs, then lanes 0 + 1.
BITNET_AVX512 static inline float fold_lanes(__m512 a) {
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

// 16 floats of a key or value row: loaded, or widened from halves (exactly: every half is a
// float), so a half cache gives the float cache's bits without a widened copy of the tile.
BITNET_AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
BITNET_AVX512 static inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int R, typename T>
BITNET_AVX512 void scores_by_key_avx512(const QueryRow* rows, const T* key_tile, const T* prefetch_values,
                                        int64_t D, int64_t t0, int64_t n, float* scores) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t j = 0; j < n; ++j) {
    const T* key = key_tile + j * D;
    // The key a few rows on, and this key's value (the pass over values follows this tile).
    for (int64_t c = 0; c < D; c += kLine) {
      _mm_prefetch(reinterpret_cast<const char*>(key + kPrefetchKeys * D + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(prefetch_values + j * D + c), _MM_HINT_T1);
    }
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __m512 k = load16(key + c);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[r].q + c), k, acc[r]);
    }
    for (int r = 0; r < R; ++r)
      scores[r * kTileKeys + j] = t0 + j <= rows[r].last_key ? fold_lanes(acc[r]) : kMinusInf;
  }
}

BITNET_AVX512 void scores_transposed_avx512(const QueryRow* rows, int64_t n_rows, const float* key_tile, int64_t D,
                                            int64_t t0, int64_t n, float* transposed, float* scores) {
  transpose_tile(key_tile, n, D, transposed);
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
template <int R, typename T>
BITNET_AVX512 void add_values_avx512(const QueryRow* rows, const T* value_tile, int64_t D, int64_t n,
                                     const float* weights) {
  for (int64_t c0 = 0; c0 < D; c0 += 64) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_loadu_ps(rows[r].partial + c0 + 16 * i);
    for (int64_t j = 0; j < n; ++j) {
      const T* value = value_tile + j * D + c0;
      __m512 v[4];
      for (int i = 0; i < 4; ++i) v[i] = load16(value + 16 * i);
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_set1_ps(weights[r * kTileKeys + j]);
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_fmadd_ps(w, v[i], acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(rows[r].partial + c0 + 16 * i, acc[r][i]);
  }
}

// Rows' weighted values of one tile, four rows a pass.
template <typename T>
BITNET_AVX512 void add_tile_values(const QueryRow* rows, int64_t n_rows, const T* values, int64_t D, int64_t n,
                                   const float* scores) {
  using ValuesFn = void (*)(const QueryRow*, const T*, int64_t, int64_t, const float*);
  static constexpr ValuesFn add_values[4] = {add_values_avx512<1, T>, add_values_avx512<2, T>,
                                             add_values_avx512<3, T>, add_values_avx512<4, T>};
  for (int64_t r = 0; r < n_rows; r += 4)
    add_values[std::min<int64_t>(4, n_rows - r) - 1](rows + r, values, D, n, scores + r * kTileKeys);
}

// Decode (few rows): scores per key read straight from the cache, float or half.
template <typename T>
BITNET_AVX512 void scores_by_key_rows(const QueryRow* rows, int64_t n_rows, const T* keys, const T* values,
                                      int64_t D, int64_t t0, int64_t n, float* scores) {
  using ScoresFn = void (*)(const QueryRow*, const T*, const T*, int64_t, int64_t, int64_t, float*);
  static constexpr ScoresFn by_key[kByKeyRows] = {
      scores_by_key_avx512<1, T>, scores_by_key_avx512<2, T>, scores_by_key_avx512<3, T>, scores_by_key_avx512<4, T>,
      scores_by_key_avx512<5, T>, scores_by_key_avx512<6, T>, scores_by_key_avx512<7, T>, scores_by_key_avx512<8, T>};
  by_key[n_rows - 1](rows, keys, values, D, t0, n, scores);
}

BITNET_AVX512 void attend_tile_avx512(const QueryRow* rows, int64_t n_rows, const CacheTiles& cache, int64_t D,
                                      int64_t t0, int64_t n, float* scores, float* transposed) {
  // Few rows read the cache in place (a half cache widened in registers); many rows score a
  // transposed tile, and a half cache's tiles are widened into scratch first.
  const bool by_key = n_rows <= kByKeyRows;
  const bool half = cache.widen != nullptr;
  if (by_key && half)
    scores_by_key_rows(rows, n_rows, static_cast<const uint16_t*>(cache.keys) + t0 * D,
                       static_cast<const uint16_t*>(cache.values) + t0 * D, D, t0, n, scores);
  else if (by_key)
    scores_by_key_rows(rows, n_rows, static_cast<const float*>(cache.keys) + t0 * D,
                       static_cast<const float*>(cache.values) + t0 * D, D, t0, n, scores);
  else
    scores_transposed_avx512(rows, n_rows, cache.key_tile(t0, n), D, t0, n, transposed, scores);
  for (int64_t r = 0; r < n_rows; ++r) {
    float* sc = scores + r * kTileKeys;
    if (!softmax_tile(sc, n, rows[r].partial, D)) std::fill(sc, sc + n, 0.0f);
  }
  if (by_key && half)
    add_tile_values(rows, n_rows, static_cast<const uint16_t*>(cache.values) + t0 * D, D, n, scores);
  else
    add_tile_values(rows, n_rows, cache.value_tile(t0, n), D, n, scores);
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
}  // namespace bitnet

#else  // no x86 SIMD in this build: the portable kernel runs everywhere

namespace bitnet {
bool avx512_attends(int64_t) { return false; }
void attend_item_avx512(const AttentionProblem&, const AttendItem&, const QueryRow*, int64_t, float*, float*, float*) {}
void widen_f16c(const uint16_t*, float*, int64_t) {}
void widen_avx512(const uint16_t*, float*, int64_t) {}
}  // namespace bitnet

#endif

