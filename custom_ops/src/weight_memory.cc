// Weight memory of the bitnet custom ops (weight_memory.h): owned weight copies in slabs of
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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace bitnet {

// ---- Weights: owned copies in huge-page slabs -----------------------------------------------
//
// By default (BITNET_WEIGHTS unset or "owned") each BitLinear, MatMulI8 and MatMulF16 copies
// its constant W at kernel creation into a buffer of its own, 2 MiB aligned and advised for
// transparent huge pages (one TLB entry per 2 MiB of the weight stream instead of 512), then
// hints the kernel to take back the pages of ORT's copy (release_pages below), so the weights
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

#if defined(__linux__)
// Whether every page of [first, last) is present and a page of a file (or shared memory), not
// an anonymous or copied-on-write one: /proc/self/pagemap, bits 63 (present) and 61.
static bool file_pages(uintptr_t first, uintptr_t last, uintptr_t page) {
  FILE* f = std::fopen("/proc/self/pagemap", "rb");
  if (f == nullptr) return false;
  bool all = std::fseek(f, static_cast<long>(first / page * 8), SEEK_SET) == 0;
  uint64_t entries[512];
  for (uintptr_t at = first; all && at < last;) {
    const size_t n = std::min<size_t>(512, (last - at) / page);
    all = std::fread(entries, 8, n, f) == n;
    for (size_t i = 0; all && i < n; ++i) all = (entries[i] >> 63 & 1) && (entries[i] >> 61 & 1);
    at += n * page;
  }
  std::fclose(f);
  return all;
}
#endif

// Lets the OS take back ORT's pages of [p, p + bytes) once copied (whole pages only; a hint,
// errors ignored). `keep_cached`: the pages may still be read through ORT (a head table that is
// also the embedding's Gather table), so pages of a file are only unmapped (MADV_DONTNEED: they
// stay in the page cache and come back with a minor fault; nothing of a file page can be lost);
// otherwise, and for anything else, MADV_PAGEOUT reclaims them (anonymous memory without swap
// stays as it is). Measured: with MADV_PAGEOUT on the tied int8 table, each embedding row read
// from disk again made a 128-token prefill 1.4x slower in a fresh process.
static void release_pages(const uint8_t* p, size_t bytes, bool keep_cached) {
#if defined(__linux__) && defined(MADV_PAGEOUT)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + bytes) / page * page;
  if (last <= first) return;
  const bool unmap = keep_cached && file_pages(first, last, page);
  madvise(reinterpret_cast<void*>(first), last - first, unmap ? MADV_DONTNEED : MADV_PAGEOUT);
#else
  (void)p;
  (void)bytes;
  (void)keep_cached;
#endif
}

// A copy of `bytes` at `src` in a slab; nullptr when memory is short (the kernel then reads
// ORT's copy).
std::unique_ptr<OwnedBuffer> own_copy(const uint8_t* src, size_t bytes, bool keep_cached) {
  constexpr size_t kHuge = size_t{2} << 20, kSlab = size_t{64} << 20;
  const size_t need = (bytes + 63) / 64 * 64;
  auto buffer = std::make_unique<OwnedBuffer>();
  {
    std::lock_guard<std::mutex> lock(slabs_mutex);
    // A copy larger than a slab (a head table) gets a slab of its own; the open one stays open.
    const bool alone = need > kSlab;
    Slab* slab = open_slab;
    if (alone || slab == nullptr || slab->size - slab->used < need) {
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
      slab = new Slab{static_cast<uint8_t*>(mem), size, 0, 0};
      if (!alone) open_slab = slab;  // the full one is freed by its last buffer
    }
    buffer->slab = slab;
    buffer->data = slab->base + slab->used;
    buffer->bytes = bytes;
    owned_bytes += bytes;
    slab->used += need;
    ++slab->users;
  }
  // Copied in 32 MiB pieces, each released from ORT's copy right after, so a 656 MB head table
  // is never resident twice.
  constexpr size_t kPiece = size_t{32} << 20;
  for (size_t done = 0; done < bytes;) {
    const size_t piece = std::min(kPiece, bytes - done);
    std::memcpy(buffer->data + done, src + done, piece);
    release_pages(src + done, piece, keep_cached);
    done += piece;
  }
  return buffer;
}

size_t owned_weight_bytes() {
  std::lock_guard<std::mutex> lock(slabs_mutex);
  return owned_bytes;
}

// ---- lm_head tables ORT holds, in 2 MiB pages in place ------------------------------------------
//
// With BITNET_WEIGHTS=ort (or a head table that is not a constant) the head kernels read ORT's
// table, in 4 KiB pages (its heap, or its mmap of the external data file), where the same kernel
// streamed ~1.8x slower than in 2 MiB pages (bench/bench_heads.py). So the first call asks the
// kernel to back the table's 2 MiB-aligned interior with huge pages in place (MADV_HUGEPAGE, then
// MADV_COLLAPSE, Linux 6.1+): no copy, contents unchanged. Best effort: on a private mapping of
// the data file it collapsed 63 of 320 MB here (Linux 6.18), hence the owned copies above.
// BITNET_HUGEPAGES=0 disables it.
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
