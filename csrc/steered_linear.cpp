// CPU kernels for lineas::steered_linear and lineas::steered_linear_backward: a Linear layer whose input
// (where = 0, prologue: an ":in" site) or output (where = 1, epilogue) is steered per batch row, as one
// op — no Python glue per call. Schemas, the pure-torch oracle, fake impls and autograd live in Python
// (lineas_fast/ops/__init__.py, lineas_fast/ops/reference.py); this file only registers CPU kernels.
//
//   x viewed as [M, in] rows, M = B*N (B = x.size(0), 1 for a 1-D x); row m belongs to batch item m/N,
//   which reads table entry r = (b*R)/B; ids[r] = -1 -> unsteered, else a = 1 + s*(scale[id]-1),
//   c = s*shift[id] (s = strength[r]), all fp32.
//   prologue: h = a*x + c (rounded to x's dtype), y = linear(h, W, bias)
//   epilogue: y = linear(x, W, bias), then y = a*y + c in place (fp32 math, rounded once)
//   backward, prologue: g = grad.W; grad_x = g*a; dscale[id] += s*g*x; dshift[id] += s*g
//   backward, epilogue: p = linear(x, W, bias) (recomputed); grad_x = (grad*a).W;
//                       dscale[id] += s*grad*p; dshift[id] += s*grad
//
// The matmuls are ATen's own (at::linear / at::mm: the same MKL / oneDNN call nn.Linear makes, same
// numerics), so the op costs one plain Linear plus one memory-bound pass over x (prologue) or y
// (epilogue) — a few percent of the matmul at MLP shapes (benchmarks/results/steered_linear_cpu.md).
// A run of rows sharing a table entry computes its a, c once (see pass_body; bf16 on AVX-512 has a
// hand-vectorised row). Unsteered rows are copied (prologue) or left alone (epilogue); with no live
// steered entry the prologue skips the pass. The pass is OpenMP over contiguous row blocks; backward
// sums go to per-thread [K, 2, d] partials added in thread order (deterministic for a given thread
// count). Like norm_affine.cpp, the pass is compiled for x86-64 baseline, AVX2 and AVX-512 and picked
// once per process (LINEAS_FAST_CPU_ISA=default|avx2 caps it).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

namespace lineas {
namespace {


constexpr int64_t kPrologue = 0, kEpilogue = 1;
constexpr int64_t kParallelMin = 65536;  // elements below which threads cost more than they save

// One row pass over [M, d] contiguous buffers (raw pointers, x's dtype unless noted).
struct Pass {
  const void* in;     // forward: x (prologue) / y (epilogue); backward: g (prologue) / grad (epilogue)
  void* out;          // forward: h / y (may alias in); backward: grad_x (prologue, aliases in) / grad*a
  const void* other;  // backward only: x (prologue) / p = linear(x) (epilogue)
  const float* scale; const float* shift;  // [K, d]
  const int64_t* ids; const float* strength;
  int64_t B, N, R, d;
};

// Rows [r0, r1). Forward: out = a*in + c; buf holds 2*d floats, the (a, c) of the entry a run of rows
// shares (computed once per run: one FMA per element after that; a row whose entry the next row does
// not share, e.g. per-row routing of 2-D x, applies a, c on the fly instead). Grad: out = a*in and
// part[id] += (s*in*other, s*in), a on the fly (the backward is dominated by its matmuls).
template <class IO, bool Grad>
LINEAS_ALWAYS_INLINE void pass_body(const Pass& p, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::T;
  const int64_t d = p.d;
  int64_t cached = -1;  // entry whose (a, c) are in buf
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t r = (row / p.N) * p.R / p.B;
    const int64_t id = p.ids[r];
    const T* in = static_cast<const T*>(p.in) + row * d;
    T* out = static_cast<T*>(p.out) + row * d;
    if (id < 0) {
      if (static_cast<const void*>(out) != static_cast<const void*>(in)) std::memcpy(out, in, d * sizeof(T));
      continue;
    }
    const float s = p.strength[r];
    const float* sc = p.scale + id * d;
    const float* sh = p.shift + id * d;
    if constexpr (requires { IO::steer_row; }) {  // a hand-vectorised row (computes a, c itself)
      static_assert(!Grad);
      IO::steer_row(in, out, sc, sh, s, d);
    } else if constexpr (!Grad) {
      float* A = buf;
      float* C = buf + d;
      if (r != cached && !(row + 1 < r1 && ((row + 1) / p.N) * p.R / p.B == r)) {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) IO::st(out, i, IO::ld(in, i) * (1.0f + s * (sc[i] - 1.0f)) + s * sh[i]);
        continue;
      }
      if (r != cached) {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          A[i] = 1.0f + s * (sc[i] - 1.0f);
          C[i] = s * sh[i];
        }
        cached = r;
      }
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) IO::st(out, i, IO::ld(in, i) * A[i] + C[i]);
    } else {
      const T* o = static_cast<const T*>(p.other) + row * d;
      float* dsc = buf + id * 2 * d;
      float* dsh = dsc + d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {  // in[i] is read before out[i] (which may alias it) is written
        const float g = IO::ld(in, i), sg = s * g;
        dsc[i] += sg * IO::ld(o, i);
        dsh[i] += sg;
        IO::st(out, i, g * (1.0f + s * (sc[i] - 1.0f)));
      }
    }
  }
}

// ------------------------------------------------------------------ ISA variants and dispatch
using PassFn = void (*)(const Pass&, int64_t, int64_t, float*);
template <class IO, bool G> void pass_base(const Pass& p, int64_t a, int64_t b, float* q) {
  pass_body<IO, G>(p, a, b, q);
}
#ifdef LINEAS_X86_VARIANTS

// bf16 forward rows on AVX-512 written with intrinsics: the rounding is bit-identical to convert.h (nearest
// even, NaN stays NaN) but narrowed with one vpmovdw per 16 values, where GCC's vectorisation of the scalar
// code packs with four permutes per 32 — 1.5x faster, which is most of the op's bf16 overhead. a and c
// are computed in registers (the row is bound by the conversion, not by two more FMAs).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
struct BF16Avx512 : BF16 {
  LINEAS_AVX512 static void steer_row(const T* in, T* out, const float* sc, const float* sh, float s, int64_t d) {
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x40);
    const __m512 vs = _mm512_set1_ps(s), fone = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
      const __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
      const __m512 a = _mm512_fmadd_ps(vs, _mm512_sub_ps(_mm512_loadu_ps(sc + i), fone), fone);
      const __m512 v = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), a,
                                       _mm512_mul_ps(vs, _mm512_loadu_ps(sh + i)));
      const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(hi, one)), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(hi, quiet));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < d; ++i) st(out, i, ld(in, i) * (1.0f + s * (sc[i] - 1.0f)) + s * sh[i]);
  }
};
#pragma GCC diagnostic pop

template <class IO, bool G>
__attribute__((target("avx2,fma,f16c"))) void pass_avx2(const Pass& p, int64_t a, int64_t b, float* q) {
  pass_body<IO, G>(p, a, b, q);
}
template <class IO, bool G>
LINEAS_AVX512 void pass_avx512(const Pass& p, int64_t a, int64_t b, float* q) {
  pass_body<IO, G>(p, a, b, q);
}
#endif

template <class IO, bool G> PassFn pick(Isa isa) {
#ifdef LINEAS_X86_VARIANTS
  if (isa == kAvx512) return &pass_avx512<IO, G>;
  if (isa == kAvx2) return &pass_avx2<IO, G>;
#endif
  (void)isa;
  return &pass_base<IO, G>;
}
template <bool G> PassFn pick(at::ScalarType dt) {
  const Isa isa = cpu_isa();
#ifdef LINEAS_X86_VARIANTS
  if constexpr (!G) {
    if (dt == at::kBFloat16 && isa == kAvx512) return &pass_avx512<BF16Avx512, false>;
  }
#endif
  return dt == at::kFloat ? pick<F32, G>(isa) : dt == at::kBFloat16 ? pick<BF16, G>(isa) : pick<F16, G>(isa);
}

// Runs the pass over M rows, OpenMP over one contiguous block per thread. Grad: returns the summed
// [K, d] (dscale, dshift); rows with id < 0 add nothing.
template <bool Grad>
std::tuple<at::Tensor, at::Tensor> run(const Pass& p, int64_t M, int64_t K, at::ScalarType dt) {
  const PassFn fn = pick<Grad>(dt);
  const bool parallel = M > 1 && M * p.d >= kParallelMin;
#ifdef _OPENMP
  const int T = parallel ? omp_get_max_threads() : 1;
#else
  const int T = 1;
#endif
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor part = Grad ? at::zeros({T, K, 2, p.d}, f32) : at::Tensor();
  float* pp = Grad ? part.data_ptr<float>() : nullptr;
#pragma omp parallel num_threads(T) if (parallel)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t r0 = M * t / nt, r1 = M * (t + 1) / nt;
    std::vector<float> buf(Grad ? 0 : 2 * p.d);  // forward: this thread's (a, c)
    if (r1 > r0) fn(p, r0, r1, Grad ? pp + static_cast<int64_t>(t) * K * 2 * p.d : buf.data());
  }
  if constexpr (!Grad) {
    return {};
  } else {
    at::Tensor sums = T == 1 ? part.select(0, 0) : part.sum(0);  // [K, 2, d]: thread partials summed
    return {sums.select(1, 0).contiguous(), sums.select(1, 1).contiguous()};
  }
}

// ------------------------------------------------------------------ validation and setup
struct Setup {
  at::Tensor w, scale, shift, ids, strength;
  std::optional<at::Tensor> b;
  int64_t in = 0, out = 0, M = 0, B = 0, R = 0, K = 0, d = 0;
  bool live = false;  // some live entry r < R is steered (ids[r] >= 0)
  std::vector<int64_t> out_shape;
  Pass pass(const void* in_p, void* out_p, const void* other) const {
    return Pass{in_p, out_p, other, scale.data_ptr<float>(), shift.data_ptr<float>(),
                ids.data_ptr<int64_t>(), strength.data_ptr<float>(), B, B ? M / B : 0, R, d};
  }
};

Setup prepare(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              int64_t where, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& ids,
              const at::Tensor& strength, const at::Tensor& nrows) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got a scalar");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(where == kPrologue || where == kEpilogue, op, ": where=", where,
              ": expected 0 (prologue, input site) or 1 (epilogue, output site)");
  for (const auto* t : {&x, &weight, &scale, &shift, &ids, &strength, &nrows}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": CPU kernel got a tensor on ", t->device());
  }
  Setup S;
  S.in = x.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == S.in && at::isFloatingType(weight.scalar_type()), op,
              ": weight must be a floating [out_features, in_features] tensor with in_features = x.size(-1) = ",
              S.in, ", got ", weight.scalar_type(), " ", weight.sizes());
  S.out = weight.size(0);
  S.w = weight.scalar_type() == dt ? weight : weight.to(dt);  // nn.Linear's matmul runs in x's dtype
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": CPU kernel got bias on ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == S.out && at::isFloatingType(bias->scalar_type()), op,
                ": bias must be a floating tensor of shape [", S.out, "] (weight.size(0)), got ",
                bias->scalar_type(), " ", bias->sizes());
    S.b = bias->scalar_type() == dt ? *bias : bias->to(dt);
  }
  S.d = where == kPrologue ? S.in : S.out;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && shift.scalar_type() == at::kFloat, op,
              ": scale/shift must be float32, got ", scale.scalar_type(), " and ", shift.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.size(1) == S.d && shift.sizes() == scale.sizes(), op,
              ": scale/shift must both have shape [K, d] with d = ",
              where == kPrologue ? "in_features" : "out_features", " = ", S.d, ", got ", scale.sizes(), " and ",
              shift.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) >= 1, op,
              ": ids must be a non-empty int64 [C] tensor, got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(strength.scalar_type() == at::kFloat && strength.sizes() == ids.sizes(), op,
              ": strength must be float32 of shape ", ids.sizes(), " (like ids), got ", strength.scalar_type(),
              " ", strength.sizes());
  TORCH_CHECK(nrows.scalar_type() == at::kLong && nrows.numel() == 1, op,
              ": nrows must be an int64 tensor with one element, got ", nrows.scalar_type(), " ", nrows.sizes());
  const int64_t C = ids.size(0);
  S.K = scale.size(0);
  S.R = *nrows.contiguous().data_ptr<int64_t>();
  TORCH_CHECK(S.R >= 1 && S.R <= C, op, ": nrows[0] = ", S.R, " is out of range 1..", C,
              " (the routing table's capacity)");
  S.ids = ids.contiguous();
  const int64_t* pid = S.ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < S.R; ++r) {
    TORCH_CHECK(pid[r] >= -1 && pid[r] < S.K, op, ": ids[", r, "] = ", pid[r], " is out of range -1..", S.K - 1,
                " (K = scale.size(0))");
    S.live = S.live || pid[r] >= 0;
  }
  S.scale = scale.contiguous();
  S.shift = shift.contiguous();
  S.strength = strength.contiguous();
  S.B = x.dim() >= 2 ? x.size(0) : 1;
  S.M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) S.M *= x.size(i);
  S.out_shape = x.sizes().vec();
  S.out_shape.back() = S.out;
  return S;
}

at::Tensor steered_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t where, const at::Tensor& scale, const at::Tensor& shift,
                              const at::Tensor& ids, const at::Tensor& strength, const at::Tensor& nrows) {
  const Setup S = prepare("lineas::steered_linear", x, weight, bias, where, scale, shift, ids, strength, nrows);
  at::Tensor x2 = x.reshape({S.M, S.in});
  if (where == kPrologue) {
    if (S.live && S.M > 0) {
      x2 = x2.contiguous();
      at::Tensor h = at::empty_like(x2);
      run<false>(S.pass(x2.data_ptr(), h.data_ptr(), nullptr), S.M, S.K, x.scalar_type());
      x2 = h;
    }
    return at::linear(x2, S.w, S.b).view(S.out_shape);
  }
  at::Tensor y = at::linear(x2, S.w, S.b).contiguous();
  if (S.live && S.M > 0) run<false>(S.pass(y.data_ptr(), y.data_ptr(), nullptr), S.M, S.K, x.scalar_type());
  return y.view(S.out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> steered_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t where, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& ids, const at::Tensor& strength, const at::Tensor& nrows) {
  const char* op = "lineas::steered_linear_backward";
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": CPU kernel got grad_out on ", grad_out.device());
  const auto gdt = grad_out.scalar_type();
  TORCH_CHECK(gdt == at::kFloat || gdt == at::kBFloat16 || gdt == at::kHalf, op,
              ": grad_out must be float32, bfloat16 or float16, got ", gdt);
  // Mixed dtypes (rare; autograd passes grads in x's dtype): compute in fp32, cast grad_x back.
  const bool mixed = gdt != x_in.scalar_type();
  const at::Tensor x = mixed ? x_in.to(at::kFloat) : x_in;
  const Setup S = prepare(op, x, mixed ? weight.to(at::kFloat) : weight, bias, where, scale, shift, ids, strength,
                          nrows);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(S.out_shape), op, ": grad_out must have the output's shape ",
              at::IntArrayRef(S.out_shape), ", got ", grad_out.sizes());
  const at::Tensor go = (mixed ? grad_out.to(at::kFloat) : grad_out).reshape({S.M, S.out}).contiguous();
  const at::Tensor x2 = x.reshape({S.M, S.in}).contiguous();
  at::Tensor gx, g_scale, g_shift;
  if (!S.live || S.M == 0) {  // no steered row: plain Linear backward, zero table grads
    gx = at::mm(go, S.w);
    g_scale = at::zeros({S.K, S.d}, S.scale.options());
    g_shift = at::zeros({S.K, S.d}, S.scale.options());
  } else if (where == kPrologue) {
    gx = at::mm(go, S.w);  // g = grad.W, turned into grad_x = g*a in place
    std::tie(g_scale, g_shift) = run<true>(S.pass(gx.data_ptr(), gx.data_ptr(), x2.data_ptr()), S.M, S.K,
                                           x.scalar_type());
  } else {
    const at::Tensor pre = at::linear(x2, S.w, S.b).contiguous();
    at::Tensor ga = at::empty_like(go);
    std::tie(g_scale, g_shift) = run<true>(S.pass(go.data_ptr(), ga.data_ptr(), pre.data_ptr()), S.M, S.K,
                                           x.scalar_type());
    gx = at::mm(ga, S.w);
  }
  gx = gx.view(x.sizes());
  return {mixed ? gx.to(x_in.scalar_type()) : gx, g_scale, g_shift};
}

}  // namespace

// Implementations only: the schemas are defined by lineas_fast/ops/__init__.py (torch.library).
TORCH_LIBRARY_IMPL(lineas, CPU, m) {
  m.impl("steered_linear", &steered_linear_cpu);
  m.impl("steered_linear_backward", &steered_linear_backward_cpu);
}

}  // namespace lineas
