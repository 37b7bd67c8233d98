// Standalone driver for the BitLinear and MatMulI8 kernels at decode shapes: no ONNX Runtime,
// the kernel alone on weights that do not fit in cache, against a plain streaming read of the
// same bytes.
//
//   g++ -O2 -std=c++17 -pthread -Icustom_ops/src bench/kernel_driver.cc custom_ops/src/dispatch.cc \
//       custom_ops/src/kernels_reference.cc custom_ops/src/kernels_x86_avx2.cc \
//       custom_ops/src/kernels_x86_avx512.cc -o bench/out/kernel_driver
//   bench/out/kernel_driver LEVEL K N [threads=1] [copies=0: enough for 600 MB] [reps=20] [hugepages=1] [rows=1]
//
// LEVEL is a BITNET_KERNEL level (avx2, avxvnni, avx512vnni, ...), "head:LEVEL" (that level's
// MatMulI8, the int8 lm_head, on an [N, K] int8 table) or "stream" (the read loop). It reports
// GB/s of weight bytes (rows > 1: a batch of that many rows of x per call). Used to find the
// kernels' speed limits (see bench/README.md "Profile"); the numbers that count are the in-ORT
// ones of bench_ops.py.

#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "kernels.h"

using namespace bitnet;

static uint8_t* alloc_weights(size_t bytes, bool huge) {
  const size_t align = 2 << 20;
  void* p = nullptr;
  if (posix_memalign(&p, align, (bytes + align - 1) / align * align)) return nullptr;
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  else madvise(p, bytes, MADV_NOHUGEPAGE);
  return static_cast<uint8_t*>(p);
}

__attribute__((target("avx512f,avx512bw"))) static int64_t stream_read(const uint8_t* p, size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s LEVEL K N [threads] [copies] [reps] [hugepages] [rows]\n", argv[0]);
    return 2;
  }
  std::string level = argv[1];
  const bool head = level.rfind("head:", 0) == 0;
  if (head) level = level.substr(5);
  const int64_t K = std::atoll(argv[2]), N = std::atoll(argv[3]);
  const int threads = argc > 4 ? std::atoi(argv[4]) : 1;
  int64_t copies = argc > 5 ? std::atoll(argv[5]) : 0;
  const int reps = argc > 6 ? std::atoi(argv[6]) : 20;
  const bool huge = argc > 7 ? std::atoi(argv[7]) != 0 : true;
  const int64_t M = argc > 8 ? std::max(1ll, std::atoll(argv[8])) : 1;
  const int64_t Kp = round_up(K, kBlockK);
  const int64_t wbytes = head ? N * K : packed_bytes(N, K);
  if (copies == 0) copies = std::max<int64_t>(1, (600ll << 20) / wbytes);
  const size_t total = static_cast<size_t>(wbytes * copies);

  KernelSet ks{};
  std::string err;
  const bool stream = level == "stream";
  if (!stream && !select_kernels(level.c_str(), &ks, &err)) {
    std::fprintf(stderr, "%s\n", err.c_str());
    return 2;
  }
  uint8_t* w = alloc_weights(total, huge);
  std::mt19937_64 rng(1);
  for (size_t i = 0; i < total; i += 8) {
    const uint64_t r = rng();
    // codes 0..2 in every 2-bit field: map each 2-bit field of r onto {0,1,2}
    uint64_t v = 0;
    for (int f = 0; f < 32; ++f) v |= (((r >> (2 * f)) & 3) % 3) << (2 * f);
    std::memcpy(w + i, &v, std::min<size_t>(8, total - i));
  }
  const int64_t Kq = head ? round_up(K, kI8PadK) : Kp;  // MatMulI8 pads its q rows to 64
  std::vector<int8_t> xq(M * Kq, 0), rq(M * Kq, 0);
  std::vector<int32_t> xsum(M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      xq[m * Kq + k] = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
      rq[m * Kq + k] = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
      xsum[m] += xq[m * Kq + k];
    }
  const std::vector<float> xscale(M, 1.0f);
  const float S = 1.0f;
  std::vector<float> y(N * M);
  const int64_t groups = round_up(N, kGroupCols) / kGroupCols;

  std::atomic<int64_t> sink{0};
  auto run_copy = [&](int64_t c, int t) {
    if (stream) {
      const size_t part = wbytes / threads;
      sink += stream_read(w + c * wbytes + t * part, part);
      return;
    }
    if (head) {
      const int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;
      MatMulI8Problem p{xq.data(), xsum.data(), xscale.data(), rq.data(), xsum.data(), xscale.data(),
                        reinterpret_cast<const int8_t*>(w + c * wbytes), &S, false, y.data(), M, N, K, Kq};
      ks.matmul_i8(p, 0, M, n0, n1);
      return;
    }
    BitLinearProblem p{xq.data(), xsum.data(), xscale.data(), w + c * wbytes, &S, false, y.data(), M, N, Kp};
    const int64_t g0 = groups * t / threads, g1 = groups * (t + 1) / threads;
    ks.bitlinear(p, 0, M, g0, g1);
  };
  // A persistent worker per extra thread, released per copy through a generation counter.
  std::atomic<int64_t> generation{-1}, done{0};
  std::vector<std::thread> workers;
  std::atomic<bool> quit{false};
  for (int t = 1; t < threads; ++t)
    workers.emplace_back([&, t] {
      int64_t seen = -1;
      while (!quit) {
        const int64_t g = generation.load(std::memory_order_acquire);
        if (g == seen) { _mm_pause(); continue; }
        seen = g;
        run_copy(g % copies, t);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    });
  double best = 1e30, sum = 0;
  int64_t gen = 0;
  for (int r = 0; r < reps + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t c = 0; c < copies; ++c, ++gen) {
      done.store(0, std::memory_order_release);
      generation.store(gen, std::memory_order_release);
      run_copy(gen % copies, 0);
      while (done.load(std::memory_order_acquire) < threads - 1) _mm_pause();
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r == 0) continue;  // warm-up (page faults)
    best = std::min(best, s);
    sum += s;
  }
  quit = true;
  generation.store(-2);
  for (auto& th : workers) th.join();
  const double gb = static_cast<double>(total) / 1e9;
  std::printf("%s K=%lld N=%lld M=%lld threads=%d copies=%lld huge=%d: best %.1f GB/s, mean %.1f GB/s, %.1f us/call (best)\n",
              stream ? "stream" : head ? ks.matmul_i8_name : ks.bitlinear_name, (long long)K, (long long)N, (long long)M, threads, (long long)copies, huge ? 1 : 0,
              gb / best, gb * reps / sum, best / copies * 1e6);
  return sink == 42 ? 1 : 0;
}
