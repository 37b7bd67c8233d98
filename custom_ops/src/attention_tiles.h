// The pieces of the attention kernel (attention.cc) that its portable version and its x86
// twin (attention_x86.cc) share: the tile constants, the one summation order of a score, the
// online softmax over a tile, and the cache as tiles of float32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"
#include "compiler.h"

namespace bitnet {

// Everything a cloned or target-specific entry point calls is inlined into it, so its vector
// width reaches the loops (an out-of-line helper would be compiled for the baseline only);
// static: each unit keeps its own copy (they are built with different flags).
#if defined(__GNUC__) || defined(__clang__)
#define ATTENTION_INLINE static inline __attribute__((always_inline))
#else
#define ATTENTION_INLINE static inline
#endif

constexpr int64_t kLanes = 16;
constexpr int64_t kTileKeys = 64;       // scores held per row between the two passes over a tile
constexpr int64_t kBlockQueries = 16;   // prefill: queries per item (times the heads of a group)
// Keys per chunk: fixed, so how a row's keys are cut (and so its bits) never depends on the
// other rows, the batch size, the number of new tokens or the threads.
constexpr int64_t kChunkKeys = 256;
constexpr int64_t kTransposeRows = 16;  // rows from which the portable kernel transposes a tile (prefill)
constexpr int64_t kByKeyRows = 8;       // rows up to which the AVX-512 twin scores per key (decode)
static_assert(kTransposeRows > kByKeyRows, "an item with more than kByKeyRows rows transposes on every path");
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

// A tile of n keys [n, D] laid out keys along the lanes: transposed[d * kTileKeys + j], zero for
// j >= n (the prefill paths' operand).
ATTENTION_INLINE void transpose_tile(const float* key_tile, int64_t n, int64_t D, float* transposed) {
  for (int64_t j = 0; j < kTileKeys; ++j)
    for (int64_t d = 0; d < D; ++d) transposed[d * kTileKeys + j] = j < n ? key_tile[j * D + d] : 0.0f;
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

using WidenFn = void (*)(const uint16_t*, float*, int64_t);  // n halves -> floats

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

// A (row, KV head)'s tiles (attention.cc); `scratch` holds 2 * kTileKeys * D floats for a half cache.
CacheTiles cache_tiles(const AttentionProblem& p, int64_t b, int64_t g, float* scratch);

// The x86 twins (attention_x86.cc): the AVX-512 item for head sizes that are multiples of 64,
// and the half -> float widening with F16C or AVX-512.
bool avx512_attends(int64_t D);
void attend_item_avx512(const AttentionProblem& p, const AttendItem& it, const QueryRow* rows, int64_t n_rows,
                        float* scores, float* transposed, float* scratch);
void widen_f16c(const uint16_t* src, float* dst, int64_t n);
void widen_avx512(const uint16_t* src, float* dst, int64_t n);

}  // namespace bitnet
