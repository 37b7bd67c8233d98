// What the compiler offers, so the sources build with GCC and clang (Linux, macOS, clang-cl on
// Windows) and with MSVC's cl: cl has no per-function target attributes, so its build keeps
// the portable reference kernels on x86 (use clang-cl on Windows for the SIMD kernels).
#pragma once

// x86-64 SIMD kernels: compiled with per-function target attributes (GCC, clang, clang-cl).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define BITNET_X86_SIMD 1
#else
#define BITNET_X86_SIMD 0
#endif

// The x86 instruction-set levels a kernel may be compiled for (per-function target attributes;
// each level also enables the AVX2 + FMA + F16C baseline every SIMD kernel assumes).
#if BITNET_X86_SIMD
#define BITNET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BITNET_AVXVNNI __attribute__((target("avxvnni,avx2,fma,f16c")))
#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define BITNET_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define BITNET_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

// target_clones needs ifunc, which only ELF platforms have (not macOS, not Windows).
#if BITNET_X86_SIMD && defined(__ELF__) && !defined(__clang__)
#define BITNET_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#else
#define BITNET_TARGET_CLONES(...)
#endif

// The library's exported entry points (RegisterCustomOps and the ctypes queries).
#if defined(_WIN32)
#define BITNET_EXPORT __declspec(dllexport)
#else
#define BITNET_EXPORT __attribute__((visibility("default")))
#endif
