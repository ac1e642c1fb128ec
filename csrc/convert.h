// Scalar fp32 <-> bf16 / fp16 conversions written with integer bit arithmetic and branch-free selects
// (no at::BFloat16 / at::Half casts), so loops that use them vectorise under `#pragma omp simd`.
// Shared by the CPU kernels in csrc/*.cpp. Rounding: nearest even; NaN stays NaN; overflow -> inf.
#pragma once

#include <cstdint>
#include <cstring>

namespace lineas {

inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, sizeof(f)); return f; }
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof(u)); return u; }
inline uint32_t select(bool c, uint32_t a, uint32_t b) {  // c ? a : b without a branch
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// bf16 is the top half of an fp32: widen by a shift; narrow rounding to nearest even (NaN stays NaN).
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select((u & 0x7fffffffu) > 0x7f800000u, (u >> 16) | 0x0040u, rounded));
}

// IEEE fp16 <-> fp32 with bit arithmetic and branch-free selects (after Maratyszcza's FP16
// library), so the row loop vectorises. float -> half rounds to nearest even; NaN stays NaN.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_f32(sign | select(two_w < (1u << 27), f32_bits(subnormal), f32_bits(normal)));
}
inline uint16_t f32_to_f16(float f) {
  const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  float base = (bits_f32(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias > 0x71000000u ? bias : 0x71000000u;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

}  // namespace lineas
