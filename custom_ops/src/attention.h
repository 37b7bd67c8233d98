// Attention of one decoder layer over its KV cache: the part of ONNX Runtime's
// com.microsoft.GroupQueryAttention that the export uses (rotary embedding, grouped heads,
// causal, keys and values appended in place), computed so that a decode step reads each cached
// key and value once: the query heads that share a KV head go together, and long caches are
// cut into chunks whose partial softmaxes are merged afterwards (flash-decoding).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace bitnet {

struct AttentionProblem {
  // New tokens, row (b, s) at offset (b * S + s) * stride: query heads h at q + h * D, KV heads
  // g at k + g * D and v + g * D (packed QKV: the three share one buffer and one stride).
  const float *q, *k, *v;
  int64_t q_stride, kv_stride;
  void *k_cache, *v_cache;   // [B, KV, capacity, D], float or IEEE half (half_cache)
  const int32_t* past;       // [B] tokens cached before this run
  const int32_t* valid;      // [B] new tokens that are real (the rest are padding)
  const float *cos, *sin;    // [positions, D / 2]; null: no rotary embedding (do_rotary=0)
  float* out;                // [B, S, H * D]
  int64_t B, S, H, KV, D, capacity;
  float scale;
  bool half_cache;    // the cache holds float16: tiles are widened to float32 as they are read
  uint32_t features;  // CpuFeature bits of the kernel level: which twin and converters run
};

// The split of one run into work items; every buffer it owns is scratch for that run.
class AttentionRun {
 public:
  explicit AttentionRun(const AttentionProblem& p);
  size_t append_items() const { return static_cast<size_t>(p_.B * p_.S); }
  size_t attend_items() const { return static_cast<size_t>(p_.B * p_.KV * query_blocks_ * chunks_); }
  size_t merge_items() const { return static_cast<size_t>(p_.B * p_.S); }

  // Step 1, item = row (b, s): rotate the query and key, write key and value into the cache.
  void append(size_t item);
  // Step 2, item = (row b, KV head, block of queries, chunk of keys): one partial softmax.
  void attend(size_t item);
  // Step 3, item = row (b, s): merge the chunks' partials into the output.
  void merge(size_t item);

 private:
  int64_t keys_of(int64_t b) const { return p_.past[b] + p_.valid[b]; }
  float* partial(int64_t b, int64_t s, int64_t h, int64_t chunk);

  AttentionProblem p_;
  int64_t query_blocks_, block_queries_, chunks_;
  std::vector<float> q_rotated_;  // [B, S, H, D], already multiplied by scale
  std::vector<float> partials_;   // [B, S, H, chunks, D + 2]: accumulator, max, sum
};

}  // namespace bitnet
