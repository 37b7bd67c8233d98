// Which kernel each op runs: a pure function of the CPU's feature bits (kernels_for_features),
// the CPU's bits (cpu_features), and the BITNET_KERNEL levels that force a subset of them.

#include <string>

#include "kernels.h"

namespace bitnet {

namespace {

// BITNET_KERNEL levels, best first: forcing one selects kernels as if the CPU had only these
// features. "auto" is the first level this CPU has entirely.
struct Level {
  const char* name;
  uint32_t features;
  const char* needs;  // for error messages and skip reasons
};
constexpr Level kLevels[] = {
    {"avx512vnni", kFeatAvx2 | kFeatAvx512 | kFeatAvx512Vnni, "AVX-512 F/BW/VL/VNNI + AVX2/FMA/F16C"},
    {"avx512", kFeatAvx2 | kFeatAvx512, "AVX-512 F/BW/VL + AVX2/FMA/F16C"},
    {"avxvnni", kFeatAvx2 | kFeatAvxVnni, "AVX-VNNI + AVX2/FMA/F16C"},
    {"avx2", kFeatAvx2, "AVX2/FMA/F16C"},
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

}  // namespace

uint32_t cpu_features() {
  uint32_t f = 0;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    f |= kFeatAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      f |= kFeatAvx512;
      if (__builtin_cpu_supports("avx512vnni")) f |= kFeatAvx512Vnni;
    }
    if (__builtin_cpu_supports("avxvnni")) f |= kFeatAvxVnni;
  }
#endif
  return f;
}

KernelSet kernels_for_features(uint32_t features) {
  const auto& bitlinear = best(bitlinear_kernels(), features);
  const auto& f16 = best(matmul_f16_kernels(), features);
  const auto& i8 = best(matmul_i8_kernels(), features);
  return {level_name(features), bitlinear.fn, bitlinear.name, f16.fn, f16.name, i8.fn, i8.name};
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
  *error = "BITNET_KERNEL=" + name + " is not a kernel name; use reference, avx2, avxvnni, avx512, avx512vnni or auto";
  return false;
}

}  // namespace bitnet
