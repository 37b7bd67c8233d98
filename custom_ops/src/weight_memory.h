// Where the ops keep the weights they stream: BitLinear's owned copies in huge-page slabs, and
// the lm_head tables advised into 2 MiB pages in place. Memory only; no ONNX Runtime here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

namespace bitnet {

struct Slab;

// A copy of a weight tensor inside a slab; the slab is freed with its last buffer.
struct OwnedBuffer {
  Slab* slab = nullptr;
  uint8_t* data = nullptr;
  size_t bytes = 0;
  ~OwnedBuffer();
};

// BITNET_WEIGHTS is unset or "owned" (not "ort").
bool owned_weights_requested();

// A copy of `bytes` at `src` in a slab, and a hint to the OS to drop the pages of `src`
// (`keep_cached`: unmap file pages but keep them in the page cache, for tables ORT may still
// read); nullptr when memory is short (the kernel then reads the original).
std::unique_ptr<OwnedBuffer> own_copy(const uint8_t* src, size_t bytes, bool keep_cached);

// Bytes of weights held in owned copies now.
size_t owned_weight_bytes();

// Asks Linux to back the 2 MiB-aligned interior of [data, data + bytes) with huge pages in
// place (best effort; BITNET_HUGEPAGES=0 disables it; a no-op elsewhere).
void advise_huge_pages(const void* data, size_t bytes);

// Advises each distinct table once per kernel state (the pointer is stable across runs).
struct HugePageOnce {
  std::mutex mutex;
  const void* advised = nullptr;
  void operator()(const void* data, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    if (data == advised) return;
    advise_huge_pages(data, bytes);
    advised = data;
  }
};

}  // namespace bitnet
