// Pieces every C++ CPU kernel file shares: element access per I/O dtype (fp32, and bf16/fp16 through
// the bit-level conversions of convert.h), the x86 ISA variants a kernel body is compiled for, and the
// run-time choice among them (decided once per process).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "convert.h"

namespace lineas {

struct F32 {
  using T = float;
  static float ld(const T* p, int64_t i) { return p[i]; }
  static void st(T* p, int64_t i, float v) { p[i] = v; }
};
struct BF16 {
  using T = uint16_t;
  static float ld(const T* p, int64_t i) { return bf16_to_f32(p[i]); }
  static void st(T* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  static float ld(const T* p, int64_t i) { return f16_to_f32(p[i]); }
  static void st(T* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
};

#define LINEAS_ALWAYS_INLINE inline __attribute__((always_inline))

// The same row body is compiled three times (baseline SSE2, AVX2, AVX-512): setup.py builds without
// -march, so only these target attributes give the loops wide vectors.
#if defined(__x86_64__) && defined(__GNUC__)
#define LINEAS_X86_VARIANTS 1
#define LINEAS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LINEAS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// Widest supported ISA, capped by LINEAS_FAST_CPU_ISA (default|avx2|avx512); decided once.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    int best = kBase;
#ifdef LINEAS_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kAvx2;
    if (best == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = kAvx512;
#endif
    if (const char* env = std::getenv("LINEAS_FAST_CPU_ISA")) {
      const std::string v(env);
      const int cap = v == "default" ? kBase : v == "avx2" ? kAvx2 : kAvx512;
      best = best < cap ? best : cap;
    }
    return static_cast<Isa>(best);
  }();
  return isa;
}

}  // namespace lineas
