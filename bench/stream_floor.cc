// The memory floor: how fast plain loads stream a buffer far larger than the caches, with T threads.
//
//   g++ -O3 -march=native -std=c++17 -pthread bench/stream_floor.cc -o bench/out/stream_floor
//   bench/out/stream_floor THREADS [MiB=1024] [reps=7]
//
// 1 GiB in 2 MiB pages (MADV_HUGEPAGE), touched once, then read `reps` times by THREADS threads
// (each one contiguous slice, summed as 64-bit words in 8 independent lanes, which the compiler
// turns into the CPU's widest vector loads); prints the best pass as one JSON line
// {"threads": T, "gb_per_s": X, "bytes": N}. bench/bench_peers.py runs it beside every timing.

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

static uint64_t read_slice(const uint64_t* p, size_t words) {
  uint64_t lane[8] = {};
  for (size_t i = 0; i + 8 <= words; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += p[i + l];
  uint64_t s = 0;
  for (uint64_t v : lane) s ^= v;
  return s;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s THREADS [MiB=1024] [reps=7]\n", argv[0]);
    return 2;
  }
  const int threads = std::max(1, std::atoi(argv[1]));
  const size_t bytes = (argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1024) << 20;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 7;
  void* mem = nullptr;
  if (posix_memalign(&mem, size_t{2} << 20, bytes) != 0) return 1;
  madvise(mem, bytes, MADV_HUGEPAGE);
  std::memset(mem, 1, bytes);
  const auto* words = static_cast<const uint64_t*>(mem);
  const size_t per = bytes / 8 / threads / 8 * 8;
  std::atomic<uint64_t> sink{0};
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back([&, t] { sink ^= read_slice(words + t * per, per); });
    sink ^= read_slice(words, per);
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double read = static_cast<double>(per) * 8 * threads;
  std::printf("{\"threads\": %d, \"gb_per_s\": %.2f, \"bytes\": %.0f, \"sink\": %llu}\n", threads, read / best / 1e9, read,
              static_cast<unsigned long long>(sink.load() & 1));
  std::free(mem);
  return 0;
}
