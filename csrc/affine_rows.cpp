// lineas::affine_rows — per-batch-row steering of an activation tensor (CPU).
//
//   x: [B, ..., d] (any dtype of float32 / bfloat16 / float16), viewed as R = numel/d rows
//   scale, shift: float32 [d]        strength: float32 [B]  (B = x.size(0); 1 if x is 1-D)
//   y = x + s_b * (scale * x + shift - x)   for every row of batch item b, computed in fp32,
//   returned in x's dtype.
//
// bf16 is converted by bit shifts and fp16 by branch-free bit arithmetic (convert.h; no scalar
// at::BFloat16 / at::Half casts), so every inner loop vectorises.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>

#include "convert.h"

namespace lineas {
namespace {

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
