// Weight memory of the bitnet custom ops (weight_memory.h): owned BitLinear copies in slabs of
// transparent huge pages, and huge-page advice for the lm_head tables ONNX Runtime holds.

#include "weight_memory.h"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>  // madvise
#include <unistd.h>    // sysconf
#endif
#if defined(_WIN32)
#include <malloc.h>  // _aligned_malloc: Windows has no posix_memalign
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace bitnet {

// ---- BitLinear weights: owned copies in huge-page slabs ------------------------------------
//
// By default (BITNET_WEIGHTS unset or "owned") each BitLinear copies its constant W at kernel
// creation into a buffer of its own, 2 MiB aligned and advised for transparent huge pages (one
// TLB entry per 2 MiB of the weight stream instead of 512), then hints the kernel to reclaim the
// pages of ORT's copy (MADV_PAGEOUT: clean pages of the memory-mapped external data leave the
// process; anonymous memory without swap stays as it is; nothing is ever lost), so the weights
// are not held twice. Measured on the 2B4T-shaped model: 12-15 % less CPU time per decoded
// token than reading ORT's 4 KiB-page mapping, peak RSS +11 MB (bench/README.md).
// BITNET_WEIGHTS=ort: the kernels read W where ONNX Runtime holds it.

// Frees what own_copy allocated (posix_memalign, or _aligned_malloc on Windows).
static void free_aligned(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// Owned copies live in slabs of at least 64 MiB, 2 MiB aligned and huge-page advised, filled
// one after another (64-byte aligned): one small matrix per 2 MiB huge page would waste most
// of it. A slab is freed when the last kernel using it is destroyed.
struct Slab {
  uint8_t* base;
  size_t size, used;
  int users;
};

static std::mutex slabs_mutex;
static Slab* open_slab = nullptr;  // the slab new copies go to
static size_t owned_bytes = 0;     // bytes of W held in slabs now

OwnedBuffer::~OwnedBuffer() {
  std::lock_guard<std::mutex> lock(slabs_mutex);
  owned_bytes -= bytes;
  if (--slab->users == 0) {
    if (open_slab == slab) open_slab = nullptr;
    free_aligned(slab->base);
    delete slab;
  }
}

bool owned_weights_requested() {
  const char* v = std::getenv("BITNET_WEIGHTS");
  return !(v && std::string(v) == "ort");
}

// A copy of `bytes` at `src` in a slab; nullptr when memory is short (the kernel then reads
// ORT's copy).
std::unique_ptr<OwnedBuffer> own_copy(const uint8_t* src, size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20, kSlab = size_t{64} << 20;
  const size_t need = (bytes + 63) / 64 * 64;
  auto buffer = std::make_unique<OwnedBuffer>();
  {
    std::lock_guard<std::mutex> lock(slabs_mutex);
    if (open_slab == nullptr || open_slab->size - open_slab->used < need) {
      const size_t size = std::max(kSlab, (need + kHuge - 1) / kHuge * kHuge);
      void* mem = nullptr;
#if defined(_WIN32)
      mem = _aligned_malloc(size, kHuge);
      if (mem == nullptr) return nullptr;
#else
      if (posix_memalign(&mem, kHuge, size) != 0) return nullptr;
#endif
#ifdef MADV_HUGEPAGE
      madvise(mem, size, MADV_HUGEPAGE);
#endif
      if (open_slab != nullptr && open_slab->users == 0) {  // cannot happen (a full slab has users)
        free_aligned(open_slab->base);
        delete open_slab;
      }
      open_slab = new Slab{static_cast<uint8_t*>(mem), size, 0, 0};
    }
    buffer->slab = open_slab;
    buffer->data = open_slab->base + open_slab->used;
    buffer->bytes = bytes;
    owned_bytes += bytes;
    open_slab->used += need;
    ++open_slab->users;
  }
  std::memcpy(buffer->data, src, bytes);
#ifdef MADV_PAGEOUT
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(src) + page - 1) / page * page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(src) + bytes) / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);  // a hint; errors ignored
#endif
  return buffer;
}

size_t owned_weight_bytes() {
  std::lock_guard<std::mutex> lock(slabs_mutex);
  return owned_bytes;
}

// ---- lm_head tables in 2 MiB pages ------------------------------------------------------------
//
// The head tables (656 MB fp16 / 328 MB int8 for 2B4T) are read front to back once per decode
// step. ORT hands them to us in 4 KiB pages (its heap, or its mmap of the external data file),
// and in 4 KiB pages the same kernel streamed ~1.8x slower than in 2 MiB pages inside ORT
// (bench/bench_heads.py). So the first call asks the kernel to back the table's 2 MiB-aligned
// interior with huge pages in place (MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+): no copy,
// no second table in memory, contents unchanged. Best effort: where the kernel refuses (older
// kernels, file systems without large folios) nothing changes. BITNET_HUGEPAGES=0 disables it.
void advise_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__)
  static const bool enabled = [] {
    const char* env = std::getenv("BITNET_HUGEPAGES");
    return !(env && std::string(env) == "0");
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (!enabled || end <= begin) return;
  void* start = reinterpret_cast<void*>(begin);
  madvise(start, end - begin, MADV_HUGEPAGE);  // errors ignored: an optimization only
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  madvise(start, end - begin, MADV_COLLAPSE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace bitnet
