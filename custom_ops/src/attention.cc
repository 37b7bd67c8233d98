// The attention kernel (attention.h): the run's three steps, and the portable version of the
// per-item work, whose loops run over 16 independent float lanes that the compiler turns into
// AVX-512, AVX2 or NEON vectors (on x86 one clone per level, chosen once when the library
// loads; NEON is the ARM64 baseline). attention_x86.cc holds the AVX-512 twin. Each item
// streams its chunk of keys and values once for all the query heads of its KV head.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_tiles.h"
#include "kernels.h"

namespace bitnet {

namespace {

// Non-interleaved rotary embedding (rotate_half) of one head at one position; without cos/sin
// tables (do_rotary=0) the head is only multiplied by `factor`.
ATTENTION_INLINE void rotate(const float* x, const float* cos, const float* sin, int64_t half, float factor, float* out) {
  if (cos == nullptr) {
    for (int64_t i = 0; i < 2 * half; ++i) out[i] = x[i] * factor;
    return;
  }
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
  const float* cos = p.cos ? p.cos + pos * half : nullptr;
  const float* sin = p.sin ? p.sin + pos * half : nullptr;
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
  transpose_tile(key_tile, n, D, transposed);
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

}  // namespace

WidenFn widen_for(uint32_t features) {
#if BITNET_X86_SIMD
  if (features & kFeatAvx512) return widen_avx512;
  if (features & kFeatAvx2) return widen_f16c;
#endif
  return widen_portable;
}

CacheTiles cache_tiles(const AttentionProblem& p, int64_t b, int64_t g, float* scratch) {
  const int64_t offset = (b * p.KV + g) * p.capacity * p.D, bytes = p.half_cache ? 2 : 4;
  return {static_cast<const char*>(p.k_cache) + offset * bytes, static_cast<const char*>(p.v_cache) + offset * bytes,
          p.D, p.half_cache ? widen_for(p.features) : nullptr, scratch, scratch + kTileKeys * p.D};
}

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
  std::vector<float> transposed(n_rows > kByKeyRows ? static_cast<size_t>(p_.D * kTileKeys) : 0);
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
