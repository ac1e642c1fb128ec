// lineas::affine_rows — per-batch-row steering of an activation tensor (CPU).
//
//   x: [B, ..., d] (any dtype of float32 / bfloat16 / float16), viewed as R = numel/d rows
//   scale, shift: float32 [d]        strength: float32 [B]  (B = x.size(0); 1 if x is 1-D)
//   y = x + s_b * (scale * x + shift - x)   for every row of batch item b, computed in fp32,
//   returned in x's dtype.
//
// bf16 is converted by bit shifts and fp16 by branch-free bit arithmetic (no scalar at::BFloat16 /
// at::Half casts), so every inner loop vectorises.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace lineas {
namespace {

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

// One row: y[i] = x[i] + s * (scale[i] * x[i] + shift[i] - x[i]).
inline void row_f32(const float* x, float* y, const float* sc, const float* sh, float s, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    float v = x[i];
    y[i] = v + s * (sc[i] * v + sh[i] - v);
  }
}

inline void row_bf16(const uint16_t* x, uint16_t* y, const float* sc, const float* sh, float s,
                     int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    float v = bf16_to_f32(x[i]);
    y[i] = f32_to_bf16(v + s * (sc[i] * v + sh[i] - v));
  }
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
inline void row_f16(const uint16_t* x, uint16_t* y, const float* sc, const float* sh, float s,
                    int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    float v = f16_to_f32(x[i]);
    y[i] = f32_to_f16(v + s * (sc[i] * v + sh[i] - v));
  }
}

template <typename T, typename RowFn>
void run_rows(const T* x, T* y, const float* sc, const float* sh, const float* st, int64_t rows,
              int64_t rows_per_b, int64_t d, RowFn fn) {
  const bool parallel = rows * d >= 65536;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    fn(x + r * d, y + r * d, sc, sh, st[r / rows_per_b], d);
  }
}

at::Tensor affine_rows_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& strength) {
  TORCH_CHECK(x_in.dim() >= 1, "lineas::affine_rows: x must have at least 1 dim, got a scalar");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "lineas::affine_rows: x must be float32, bfloat16 or float16, got ", dt);
  const int64_t d = x_in.size(-1);
  const int64_t B = x_in.dim() >= 2 ? x_in.size(0) : 1;
  for (const auto* t : {&scale, &shift}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == d,
                "lineas::affine_rows: scale/shift must be float32 of shape [", d, "], got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(strength.scalar_type() == at::kFloat && strength.dim() == 1 && strength.size(0) == B,
              "lineas::affine_rows: strength must be float32 of shape [", B, "] (x.size(0)), got ",
              strength.scalar_type(), " ", strength.sizes());
  for (const auto* t : {&x_in, &scale, &shift, &strength}) {
    TORCH_CHECK(t->device().is_cpu(), "lineas::affine_rows: CPU kernel got a tensor on ",
                t->device());
  }

  at::Tensor x = x_in.contiguous();
  at::Tensor sc = scale.contiguous(), sh = shift.contiguous(), st = strength.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  if (rows == 0) return y;
  const int64_t rows_per_b = rows / B;

  const float* psc = sc.data_ptr<float>();
  const float* psh = sh.data_ptr<float>();
  const float* pst = st.data_ptr<float>();
  if (dt == at::kFloat) {
    run_rows(x.data_ptr<float>(), y.data_ptr<float>(), psc, psh, pst, rows, rows_per_b, d,
             row_f32);
  } else if (dt == at::kBFloat16) {
    run_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
             reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), psc, psh, pst, rows,
             rows_per_b, d, row_bf16);
  } else {
    run_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::Half>()),
             reinterpret_cast<uint16_t*>(y.data_ptr<at::Half>()), psc, psh, pst, rows, rows_per_b,
             d, row_f16);
  }
  return y;
}

}  // namespace

// FRAGMENT, not TORCH_LIBRARY: several csrc files (and Python torch.library code) may add ops to
// the `lineas` namespace, and only one non-fragment TORCH_LIBRARY block per namespace is allowed.
TORCH_LIBRARY_FRAGMENT(lineas, m) {
  m.def("affine_rows(Tensor x, Tensor scale, Tensor shift, Tensor strength) -> Tensor");
}

TORCH_LIBRARY_IMPL(lineas, CPU, m) { m.impl("affine_rows", &affine_rows_cpu); }

}  // namespace lineas
