// Which kernel each op runs: each op's kernel list, a pure function of the CPU's feature bits
// (kernels_for_features), the CPU's bits (cpu_features), and the BITNET_KERNEL levels that
// force a subset of them.

#include <cstdio>
#include <string>

#include "kernels.h"
#include "kernels_arm.h"
#include "kernels_x86.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>  // getauxval(AT_HWCAP)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // the kernel's bit for sdot/udot (older libc headers lack it)
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#if BITNET_X86_SIMD && defined(_MSC_VER)
#include <intrin.h>  // __cpuidex, _xgetbv (clang-cl)
#elif BITNET_X86_SIMD
#include <cpuid.h>
#endif
#if BITNET_X86_SIMD && defined(__linux__)
#include <sys/syscall.h>  // arch_prctl: permission for the AMX tile state
#include <unistd.h>
#endif

namespace bitnet {

namespace {

// The feature sets the levels and the kernel lists below name (one definition each).
constexpr uint32_t kNeedsAmx = kFeatAvx2 | kFeatAvx512 | kFeatAvx512Vnni | kFeatAmxInt8;
constexpr uint32_t kNeedsAvx512Vnni = kFeatAvx2 | kFeatAvx512 | kFeatAvx512Vnni;
constexpr uint32_t kNeedsAvx512 = kFeatAvx2 | kFeatAvx512;
constexpr uint32_t kNeedsAvxVnni = kFeatAvx2 | kFeatAvxVnni;
constexpr uint32_t kNeedsAvx2 = kFeatAvx2;
constexpr uint32_t kNeedsDotProd = kFeatNeon | kFeatDotProd;
constexpr uint32_t kNeedsNeon = kFeatNeon;

// BITNET_KERNEL levels, best first: forcing one selects kernels as if the CPU had only these
// features. "auto" is the first level this CPU has entirely.
struct Level {
  const char* name;
  uint32_t features;
  const char* needs;  // for error messages and skip reasons
};
constexpr Level kLevels[] = {
    {"amx", kNeedsAmx, "AMX-TILE/AMX-INT8 + AVX-512 VNNI"},
    {"avx512vnni", kNeedsAvx512Vnni, "AVX-512 F/BW/VL/VNNI + AVX2/FMA/F16C"},
    {"avx512", kNeedsAvx512, "AVX-512 F/BW/VL + AVX2/FMA/F16C"},
    {"avxvnni", kNeedsAvxVnni, "AVX-VNNI + AVX2/FMA/F16C"},
    {"avx2", kNeedsAvx2, "AVX2/FMA/F16C"},
    {"dotprod", kNeedsDotProd, "ARM64 NEON + dot product (sdot)"},
    {"neon", kNeedsNeon, "ARM64 NEON"},
    {"reference", 0, "nothing"},
};

template <typename Fn>
const KernelChoice<Fn>& best(const KernelChoice<Fn>* list, uint32_t features) {
  for (;; ++list)  // lists end with the reference, which needs nothing
    if ((list->needs & ~features) == 0) return *list;
}

const char* level_name(uint32_t features) {
  for (const Level& level : kLevels)
    if ((level.features & ~features) == 0) return level.name;
  return "reference";
}

#if BITNET_X86_SIMD
// CPUID and XGETBV directly (what __builtin_cpu_supports does inside GCC), because clang 14
// knows no "f16c" or "avxvnni" feature strings and MSVC-style compilers have no such builtin.
struct CpuidRegs {
  uint32_t a, b, c, d;
};
CpuidRegs cpuid(uint32_t leaf, uint32_t sub) {
  CpuidRegs r{0, 0, 0, 0};
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, static_cast<int>(leaf), static_cast<int>(sub));
  r = {static_cast<uint32_t>(v[0]), static_cast<uint32_t>(v[1]), static_cast<uint32_t>(v[2]), static_cast<uint32_t>(v[3])};
#else
  if (leaf > __get_cpuid_max(leaf & 0x80000000u, nullptr)) return r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
#endif
  return r;
}
uint64_t xgetbv0() {  // the register state the OS saves: AVX and AVX-512 need it on
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}
// Linux hands out the 8 KiB tile state only to processes that ask for it, once.
bool amx_permitted() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
#else
  return false;  // other systems: no AMX kernel
#endif
}

uint32_t x86_features() {
  const CpuidRegs l1 = cpuid(1, 0);
  const bool osxsave = (l1.c >> 27) & 1, avx = (l1.c >> 28) & 1, fma = (l1.c >> 12) & 1, f16c = (l1.c >> 29) & 1;
  if (!osxsave || !avx) return 0;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return 0;  // XMM and YMM state
  const uint32_t max_leaf = cpuid(0, 0).a;
  const CpuidRegs l7 = max_leaf >= 7 ? cpuid(7, 0) : CpuidRegs{0, 0, 0, 0};
  const CpuidRegs l71 = (max_leaf >= 7 && l7.a >= 1) ? cpuid(7, 1) : CpuidRegs{0, 0, 0, 0};
  uint32_t f = 0;
  if (!((l7.b >> 5) & 1) || !fma || !f16c) return 0;  // AVX2 + FMA + F16C
  f |= kFeatAvx2;
  const bool zmm_state = (xcr0 & 0xe0) == 0xe0;  // opmask, upper ZMM0-15, ZMM16-31
  if (zmm_state && ((l7.b >> 16) & 1) && ((l7.b >> 30) & 1) && ((l7.b >> 31) & 1)) {  // F, BW, VL
    f |= kFeatAvx512;
    if ((l7.c >> 11) & 1) f |= kFeatAvx512Vnni;
  }
  if ((l71.a >> 4) & 1) f |= kFeatAvxVnni;
  const bool amx_cpu = ((l7.d >> 24) & 1) && ((l7.d >> 25) & 1);  // AMX-TILE, AMX-INT8
  const bool amx_state = (xcr0 & 0x60000) == 0x60000;             // XTILECFG, XTILEDATA
  if ((f & kFeatAvx512Vnni) && amx_cpu && amx_state && amx_permitted()) f |= kFeatAmxInt8;
  return f;
}
#endif

}  // namespace

// ---- Kernel lists, best first ---------------------------------------------------------------

const KernelChoice<BitLinearKernel>* bitlinear_kernels() {
  static const KernelChoice<BitLinearKernel> list[] = {
#if BITNET_X86_SIMD
      {"amx", kNeedsAmx, bitlinear_amx},
      {"avx512vnni", kNeedsAvx512Vnni, bitlinear_avx512vnni},
      {"avx2", kNeedsAvx2, bitlinear_avx2},
#endif
#if defined(__aarch64__)
      {"dotprod", kNeedsDotProd, bitlinear_dotprod},
      {"neon", kNeedsNeon, bitlinear_neon},
#endif
      {"reference", 0, bitlinear_reference},
  };
  return list;
}

const KernelChoice<MatMulF16Kernel>* matmul_f16_kernels() {
  static const KernelChoice<MatMulF16Kernel> list[] = {
#if BITNET_X86_SIMD
      {"avx512", kNeedsAvx512, matmul_f16_avx512},
      {"avx2", kNeedsAvx2, matmul_f16_avx2},
#endif
#if defined(__aarch64__)
      {"neon", kNeedsNeon, matmul_f16_neon},
#endif
      {"reference", 0, matmul_f16_reference},
  };
  return list;
}

const KernelChoice<MatMulI8Kernel>* matmul_i8_kernels() {
  static const KernelChoice<MatMulI8Kernel> list[] = {
#if BITNET_X86_SIMD
      {"amx", kNeedsAmx, matmul_i8_amx},
      {"avx512vnni", kNeedsAvx512Vnni, matmul_i8_avx512vnni},
      {"avx512bw", kNeedsAvx512, matmul_i8_avx512bw},
      {"avxvnni", kNeedsAvxVnni, matmul_i8_avxvnni},
      {"avx2", kNeedsAvx2, matmul_i8_avx2},
#endif
#if defined(__aarch64__)
      {"neon", kNeedsNeon, matmul_i8_neon},
#endif
      {"reference", 0, matmul_i8_reference},
  };
  return list;
}

// ---- This CPU -------------------------------------------------------------------------------

uint32_t cpu_features() {
  uint32_t f = 0;
#if BITNET_X86_SIMD
  f = x86_features();
#elif defined(__aarch64__)
  f |= kFeatNeon;  // Advanced SIMD is mandatory in ARMv8-A
#if defined(__linux__)
  if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) f |= kFeatDotProd;
#elif defined(__APPLE__)
  int has = 0;
  size_t size = sizeof(has);
  if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &size, nullptr, 0) == 0 && has) f |= kFeatDotProd;
#endif
#endif
  return f;
}

KernelSet kernels_for_features(uint32_t features) {
  const auto& bitlinear = best(bitlinear_kernels(), features);
  const auto& f16 = best(matmul_f16_kernels(), features);
  const auto& i8 = best(matmul_i8_kernels(), features);
  return {level_name(features), bitlinear.fn, bitlinear.name, f16.fn, f16.name, i8.fn, i8.name,
          features};
}

bool select_kernels(const char* requested, KernelSet* out, std::string* error) {
  const std::string name = (requested && *requested) ? requested : "auto";
  const uint32_t cpu = cpu_features();
  if (name == "auto") {
    *out = kernels_for_features(cpu);
    return true;
  }
  for (const Level& level : kLevels) {
    if (name != level.name) continue;
    if ((level.features & ~cpu) != 0) {
      *error = "BITNET_KERNEL=" + name + " was requested but this CPU lacks the instructions (" + level.needs + ")";
      return false;
    }
    *out = kernels_for_features(level.features);
    return true;
  }
  *error = "BITNET_KERNEL=" + name + " is not a kernel name; use reference, avx2, avxvnni, avx512, avx512vnni, amx, neon, dotprod or auto";
  return false;
}

}  // namespace bitnet

// For custom_ops/__init__.py (via ctypes), so Python keeps no copy of the table above: the
// levels of the architecture this library was built for, weakest first, one "name features\n"
// line each (features: CpuFeature bits). Writes at most size - 1 bytes and a NUL; returns the
// table's whole length.
extern "C" BITNET_EXPORT size_t bitnet_kernel_levels(char* out, size_t size) {
  using bitnet::kFeatDotProd;
  using bitnet::kFeatNeon;
#if defined(__x86_64__) || defined(_M_X64)
  const uint32_t other_arch = kFeatNeon | kFeatDotProd;
#elif defined(__aarch64__) || defined(_M_ARM64)
  const uint32_t other_arch = ~(kFeatNeon | kFeatDotProd);
#else
  const uint32_t other_arch = ~0u;  // the reference only
#endif
  std::string table;
  for (size_t i = sizeof(bitnet::kLevels) / sizeof(bitnet::kLevels[0]); i-- > 0;) {
    const bitnet::Level& level = bitnet::kLevels[i];
    if ((level.features & other_arch) == 0)
      table += std::string(level.name) + " " + std::to_string(level.features) + "\n";
  }
  if (size > 0) std::snprintf(out, size, "%s", table.c_str());
  return table.size();
}
