// CPU kernels for lineas::norm_affine and lineas::norm_affine_backward (fused LayerNorm / RMSNorm +
// per-row steering). The schemas, the pure-torch fallback, fake impls and autograd are defined in
// Python (lineas_fast/ops/__init__.py); this file only registers CPU implementations, so it works
// whichever of `lineas_fast.ops` / `lineas_fast._C` is imported first. Semantics (the oracle):
// lineas_fast/ops/reference.py.
//
//   x viewed as [B, N, d] (B = x.size(0), 1 for a 1-D x); batch item b reads table entry
//   r = (b*R)/B, R = nrows[0]; ids[r] = -1 -> a = 1, c = 0, else a = 1 + s*(scale[id]-1),
//   c = s*shift[id] with s = strength[r]. g = weight + offset (or 1 + offset), beta = bias (or 0).
//   forward:  out = a*(xhat*g + beta) + c = xhat*A + C with A = a*g, C = a*beta + c (fp32)
//   backward: gy = go*A; gx = rstd*(gy - mean(gy) - xhat*mean(gy*xhat)) (LayerNorm; RMSNorm drops
//             mean(gy)); dscale[id] += s*go*(xhat*g + beta), dshift[id] += s*go (rows with id >= 0).
//
// Layout of the work: OpenMP splits the B*N rows into one contiguous block per thread. A block keeps
// the (A, C) vectors of the entry it last saw and recomputes them only when the entry changes, so
// a batch item's N tokens (or a broadcast R = 1 table) cost one coefficient pass. Per row: one pass
// for the statistics (LayerNorm: mean, then centred variance — two passes over the row while it is in
// L1, not E[x^2] - E[x]^2), one pass writing the output. Backward reductions go to per-thread
// [K, 2, d] buffers summed in thread order afterwards (deterministic for a given thread count).
//
// The row loops are plain `#pragma omp simd` code; every block function is compiled three times
// (x86-64 baseline, AVX2+FMA, AVX-512) and the widest one the CPU supports is picked once per
// process (setup.py builds without -march, so the baseline alone would be SSE2). The environment
// variable LINEAS_FAST_CPU_ISA=default|avx2 caps the choice (tests use it to cover every variant).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_kernels.h"

namespace lineas {
namespace {


constexpr int kLayerNorm = 0, kRmsNorm = 1;

// Everything a block of rows needs (raw pointers into contiguous CPU tensors).
struct Args {
  const void* x;      // [B*N, d], x's dtype
  const void* go;     // backward only: grad_out, x's dtype
  void* out;          // forward: y; backward: grad_x (x's dtype)
  const float* g;     // [d] weight + offset
  const float* beta;  // [d] bias
  const float* scale; const float* shift;  // [K, d]
  const int64_t* ids; const float* strength;
  int64_t B, N, R, K, d;
  float eps;
};

// Table entry r of the rows of batch item b: (id, s); id < 0 means unsteered.
LINEAS_ALWAYS_INLINE void entry_of(const Args& p, int64_t row, int64_t& r, int64_t& id, float& s) {
  const int64_t b = row / p.N;
  r = (b * p.R) / p.B;
  id = p.ids[r];
  s = p.strength[r];
}

// a = 1 + s*(scale[id]-1); A = a*g and (forward) C = a*beta + s*shift[id].
template <bool WithC>
LINEAS_ALWAYS_INLINE void coefficients(const Args& p, int64_t id, float s, float* A, float* C) {
  const float* sc = p.scale + id * p.d;
  const float* sh = p.shift + id * p.d;
  const float* g = p.g;
  const float* beta = p.beta;
  const int64_t d = p.d;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const float a = 1.0f + s * (sc[i] - 1.0f);
    A[i] = a * g[i];
    if constexpr (WithC) C[i] = a * beta[i] + s * sh[i];
  }
}

// Sums over a row with 64 independent fp32 accumulators (a few vector registers): a single
// `omp simd reduction` accumulator is one dependency chain, latency-bound when the row is in cache.
// f(i) returns the term(s) of element i; S is float or Pair. Fixed order -> deterministic.
struct Pair {
  float a, b;
};
LINEAS_ALWAYS_INLINE float sum_of(const float* acc, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; ++j) s += acc[j];
  return s;
}
template <class F>
LINEAS_ALWAYS_INLINE float row_sum(int64_t d, F f) {
  constexpr int L = 64;
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= d; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) acc[j] += f(i + j);
  }
  float tail = 0.0f;
#pragma omp simd reduction(+ : tail)
  for (int64_t k = i; k < d; ++k) tail += f(k);
  return sum_of(acc, L) + tail;
}
template <class F>
LINEAS_ALWAYS_INLINE Pair row_sum2(int64_t d, F f) {
  constexpr int L = 64;
  float acc_a[L] = {}, acc_b[L] = {};
  int64_t i = 0;
  for (; i + L <= d; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const Pair t = f(i + j);
      acc_a[j] += t.a;
      acc_b[j] += t.b;
    }
  }
  float ta = 0.0f, tb = 0.0f;
#pragma omp simd reduction(+ : ta, tb)
  for (int64_t k = i; k < d; ++k) {
    const Pair t = f(k);
    ta += t.a;
    tb += t.b;
  }
  return {sum_of(acc_a, L) + ta, sum_of(acc_b, L) + tb};
}

// Row statistics: mean (0 for RMSNorm) and 1/sqrt(var + eps), all fp32.
template <class IO, int Kind>
LINEAS_ALWAYS_INLINE void row_stats(const typename IO::T* x, int64_t d, float eps, float& mu, float& rstd) {
  const float inv_d = 1.0f / static_cast<float>(d);
  float m = 0.0f;
  if constexpr (Kind == kLayerNorm) m = row_sum(d, [&](int64_t i) { return IO::ld(x, i); }) * inv_d;
  const float ss = row_sum(d, [&](int64_t i) {
    const float v = IO::ld(x, i) - m;
    return v * v;
  });
  mu = m;
  rstd = 1.0f / std::sqrt(ss * inv_d + eps);
}

// Forward over rows [r0, r1); buf holds 2*d floats for the (A, C) of the current entry. A row whose
// entry the next row does not share (per-row routing of 2-D x, i.e. decoding) skips the cache and
// applies a, c on the fly: fewer passes over memory than writing A, C for one use.
template <class IO, int Kind>
LINEAS_ALWAYS_INLINE void fwd_body(const Args& p, int64_t r0, int64_t r1, float* buf) {
  using T = typename IO::T;
  const int64_t d = p.d;
  float* A = buf;
  float* C = buf + d;
  int64_t cached = -1;  // entry r whose coefficients are in buf
  for (int64_t row = r0; row < r1; ++row) {
    int64_t r, id;
    float s;
    entry_of(p, row, r, id, s);
    const T* x = static_cast<const T*>(p.x) + row * d;
    T* y = static_cast<T*>(p.out) + row * d;
    float mu, rstd;
    row_stats<IO, Kind>(x, d, p.eps, mu, rstd);
    const float* pa = p.g;
    const float* pc = p.beta;
    if (id >= 0) {
      if (r != cached && !(row + 1 < r1 && ((row + 1) / p.N * p.R) / p.B == r)) {
        const float* sc = p.scale + id * d;
        const float* sh = p.shift + id * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          const float yv = (IO::ld(x, i) - mu) * rstd * pa[i] + pc[i];
          IO::st(y, i, yv * (1.0f + s * (sc[i] - 1.0f)) + s * sh[i]);
        }
        continue;
      }
      if (r != cached) {
        coefficients<true>(p, id, s, A, C);
        cached = r;
      }
      pa = A;
      pc = C;
    }
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) IO::st(y, i, (IO::ld(x, i) - mu) * rstd * pa[i] + pc[i]);
  }
}

// Backward over rows [r0, r1); buf holds d floats (A), part is this thread's [K, 2, d] accumulator.
template <class IO, int Kind>
LINEAS_ALWAYS_INLINE void bwd_body(const Args& p, int64_t r0, int64_t r1, float* buf, float* part) {
  using T = typename IO::T;
  const int64_t d = p.d;
  const float inv_d = 1.0f / static_cast<float>(d);
  const float* g = p.g;
  const float* beta = p.beta;
  float* A = buf;
  int64_t cached = -1;
  for (int64_t row = r0; row < r1; ++row) {
    int64_t r, id;
    float s;
    entry_of(p, row, r, id, s);
    const float* pa = p.g;
    if (id >= 0) {
      if (r != cached) {
        coefficients<false>(p, id, s, A, nullptr);
        cached = r;
      }
      pa = A;
    }
    const T* x = static_cast<const T*>(p.x) + row * d;
    const T* go = static_cast<const T*>(p.go) + row * d;
    T* gx = static_cast<T*>(p.out) + row * d;
    float mu, rstd;
    row_stats<IO, Kind>(x, d, p.eps, mu, rstd);
    // sums for grad_x: Σ gy and Σ gy*xhat with gy = go*A
    const Pair sums = row_sum2(d, [&](int64_t i) {
      const float gy = IO::ld(go, i) * pa[i];
      return Pair{gy, gy * ((IO::ld(x, i) - mu) * rstd)};
    });
    const float sgy = sums.a, sgyx = sums.b;
    if (id >= 0) {  // dscale[id] += s*go*y, dshift[id] += s*go
      float* dsc = part + id * 2 * d;
      float* dsh = dsc + d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float sg = s * IO::ld(go, i);
        dsc[i] += sg * ((IO::ld(x, i) - mu) * rstd * g[i] + beta[i]);
        dsh[i] += sg;
      }
    }
    const float mgy = Kind == kLayerNorm ? sgy * inv_d : 0.0f;
    const float inner = sgyx * inv_d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const float xh = (IO::ld(x, i) - mu) * rstd;
      IO::st(gx, i, rstd * (IO::ld(go, i) * pa[i] - mgy - xh * inner));
    }
  }
}

// ------------------------------------------------------------------ ISA variants and dispatch
using FwdFn = void (*)(const Args&, int64_t, int64_t, float*);
using BwdFn = void (*)(const Args&, int64_t, int64_t, float*, float*);

template <class IO, int Kind> void fwd_base(const Args& p, int64_t a, int64_t b, float* buf) {
  fwd_body<IO, Kind>(p, a, b, buf);
}
template <class IO, int Kind> void bwd_base(const Args& p, int64_t a, int64_t b, float* buf, float* part) {
  bwd_body<IO, Kind>(p, a, b, buf, part);
}

#ifdef LINEAS_X86_VARIANTS
template <class IO, int Kind> LINEAS_AVX2 void fwd_avx2(const Args& p, int64_t a, int64_t b, float* buf) {
  fwd_body<IO, Kind>(p, a, b, buf);
}
template <class IO, int Kind> LINEAS_AVX512 void fwd_avx512(const Args& p, int64_t a, int64_t b, float* buf) {
  fwd_body<IO, Kind>(p, a, b, buf);
}
template <class IO, int Kind>
LINEAS_AVX2 void bwd_avx2(const Args& p, int64_t a, int64_t b, float* buf, float* part) {
  bwd_body<IO, Kind>(p, a, b, buf, part);
}
template <class IO, int Kind>
LINEAS_AVX512 void bwd_avx512(const Args& p, int64_t a, int64_t b, float* buf, float* part) {
  bwd_body<IO, Kind>(p, a, b, buf, part);
}
#endif

template <class IO, int Kind> FwdFn pick_fwd(Isa isa) {
#ifdef LINEAS_X86_VARIANTS
  if (isa == kAvx512) return &fwd_avx512<IO, Kind>;
  if (isa == kAvx2) return &fwd_avx2<IO, Kind>;
#endif
  (void)isa;
  return &fwd_base<IO, Kind>;
}
template <class IO, int Kind> BwdFn pick_bwd(Isa isa) {
#ifdef LINEAS_X86_VARIANTS
  if (isa == kAvx512) return &bwd_avx512<IO, Kind>;
  if (isa == kAvx2) return &bwd_avx2<IO, Kind>;
#endif
  (void)isa;
  return &bwd_base<IO, Kind>;
}
template <class IO> FwdFn pick_fwd(int64_t kind, Isa isa) {
  return kind == kLayerNorm ? pick_fwd<IO, kLayerNorm>(isa) : pick_fwd<IO, kRmsNorm>(isa);
}
template <class IO> BwdFn pick_bwd(int64_t kind, Isa isa) {
  return kind == kLayerNorm ? pick_bwd<IO, kLayerNorm>(isa) : pick_bwd<IO, kRmsNorm>(isa);
}

// ------------------------------------------------------------------ validation and setup
// Contiguous fp32 copies of the small operands plus the sizes; shared by forward and backward.
struct Prepared {
  at::Tensor x, scale, shift, ids, strength, keep_g, keep_b;
  std::vector<float> gbuf, bbuf;  // fp32 weight + offset / bias when they are not usable as given
  const float* g = nullptr;
  const float* beta = nullptr;
  Args args{};
};

// weight/bias as fp32 [d] plus `add` (the weight offset): the tensor's own data when it already is
// contiguous fp32 and add == 0, else converted once into buf (fill when absent). No ATen op on the
// common paths: this runs on every call, and decode-time calls are tiny.
const float* fp32_vector(const char* op, const std::optional<at::Tensor>& t, const char* name, int64_t d,
                         float fill, float add, std::vector<float>& buf, at::Tensor& keep) {
  if (!t.has_value()) {
    buf.assign(d, fill);
    return buf.data();
  }
  TORCH_CHECK(t->device().is_cpu(), op, ": CPU kernel got ", name, " on ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()) && t->dim() == 1 && t->size(0) == d, op, ": ", name,
              " must be a floating tensor of shape [", d, "] (x.size(-1)), got ", t->scalar_type(), " ",
              t->sizes());
  keep = t->contiguous();
  const auto dt = keep.scalar_type();
  if (dt == at::kFloat && add == 0.0f) return keep.data_ptr<float>();
  if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf) keep = keep.to(at::kFloat);
  buf.resize(d);
  float* out = buf.data();
  if (keep.scalar_type() == at::kFloat) {
    const float* w = keep.data_ptr<float>();
    for (int64_t i = 0; i < d; ++i) out[i] = w[i] + add;  // fp32 add, as the reference
  } else {
    const auto* w = static_cast<const uint16_t*>(keep.data_ptr());
    const bool bf = keep.scalar_type() == at::kBFloat16;
    for (int64_t i = 0; i < d; ++i) out[i] = (bf ? bf16_to_f32(w[i]) : f16_to_f32(w[i])) + add;
  }
  return out;
}

Prepared prepare(const char* op, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, double eps, int64_t kind, double weight_offset,
                 const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& ids,
                 const at::Tensor& strength, const at::Tensor& nrows) {
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least 1 dim, got a scalar");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(kind == kLayerNorm || kind == kRmsNorm, op, ": kind=", kind,
              ": expected 0 (LayerNorm) or 1 (RMSNorm)");
  const int64_t d = x_in.size(-1);
  for (const auto* t : {&x_in, &scale, &shift, &ids, &strength, &nrows}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": CPU kernel got a tensor on ", t->device());
  }
  TORCH_CHECK(scale.scalar_type() == at::kFloat && shift.scalar_type() == at::kFloat, op,
              ": scale/shift must be float32, got ", scale.scalar_type(), " and ", shift.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.size(1) == d && shift.sizes() == scale.sizes(), op,
              ": scale/shift must both have shape [K, d] with d = x.size(-1) = ", d, ", got ",
              scale.sizes(), " and ", shift.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) >= 1, op,
              ": ids must be a non-empty int64 [C] tensor, got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(strength.scalar_type() == at::kFloat && strength.sizes() == ids.sizes(), op,
              ": strength must be float32 of shape ", ids.sizes(), " (like ids), got ",
              strength.scalar_type(), " ", strength.sizes());
  TORCH_CHECK(nrows.scalar_type() == at::kLong && nrows.numel() == 1, op,
              ": nrows must be an int64 tensor with one element, got ", nrows.scalar_type(), " ",
              nrows.sizes());
  const int64_t C = ids.size(0), K = scale.size(0);
  const int64_t R = *nrows.data_ptr<int64_t>();
  TORCH_CHECK(R >= 1 && R <= C, op, ": nrows[0] = ", R, " is out of range 1..", C,
              " (the routing table's capacity)");

  Prepared P;
  P.ids = ids.contiguous();
  const int64_t* pid = P.ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(pid[r] >= -1 && pid[r] < K, op, ": ids[", r, "] = ", pid[r],
                " is out of range -1..", K - 1, " (K = scale.size(0))");
  }
  P.g = fp32_vector(op, weight, "weight", d, static_cast<float>(1.0 + weight_offset),
                    static_cast<float>(weight_offset), P.gbuf, P.keep_g);
  P.beta = fp32_vector(op, bias, "bias", d, 0.0f, 0.0f, P.bbuf, P.keep_b);
  P.x = x_in.contiguous();
  P.scale = scale.contiguous();
  P.shift = shift.contiguous();
  P.strength = strength.contiguous();

  Args& a = P.args;
  a.x = P.x.data_ptr();
  a.g = P.g;
  a.beta = P.beta;
  a.scale = P.scale.data_ptr<float>();
  a.shift = P.shift.data_ptr<float>();
  a.ids = pid;
  a.strength = P.strength.data_ptr<float>();
  a.B = x_in.dim() >= 2 ? x_in.size(0) : 1;
  a.d = d;
  a.N = (a.B == 0 || d == 0) ? 0 : x_in.numel() / (a.B * d);
  a.R = R;
  a.K = K;
  a.eps = static_cast<float>(eps);
  return P;
}

// Rows of one thread's block: [t*rows/nt, (t+1)*rows/nt).
inline void block_of(int64_t rows, int t, int nt, int64_t& r0, int64_t& r1) {
  r0 = rows * t / nt;
  r1 = rows * (t + 1) / nt;
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

constexpr int64_t kParallelMin = 65536;  // elements below which threads cost more than they save

at::Tensor norm_affine_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, int64_t kind,
                           double weight_offset, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& ids, const at::Tensor& strength, const at::Tensor& nrows) {
  Prepared P = prepare("lineas::norm_affine", x, weight, bias, eps, kind, weight_offset, scale, shift,
                       ids, strength, nrows);
  at::Tensor y = at::empty_like(P.x, at::MemoryFormat::Contiguous);
  Args& a = P.args;
  const int64_t rows = a.B * a.N;
  if (rows == 0) return y;
  a.out = y.data_ptr();
  const Isa isa = cpu_isa();
  const auto dt = P.x.scalar_type();
  const FwdFn fn = dt == at::kFloat ? pick_fwd<F32>(kind, isa)
                   : dt == at::kBFloat16 ? pick_fwd<BF16>(kind, isa) : pick_fwd<F16>(kind, isa);
  const bool parallel = rows > 1 && rows * a.d >= kParallelMin;
#pragma omp parallel if (parallel)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t r0, r1;
    block_of(rows, t, nt, r0, r1);
    std::vector<float> buf(2 * a.d);
    if (r1 > r0) fn(a, r0, r1, buf.data());
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_affine_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t kind, double weight_offset,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& ids, const at::Tensor& strength,
    const at::Tensor& nrows) {
  const char* op = "lineas::norm_affine_backward";
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": CPU kernel got grad_out on ", grad_out.device());
  const auto gdt = grad_out.scalar_type();
  TORCH_CHECK(gdt == at::kFloat || gdt == at::kBFloat16 || gdt == at::kHalf, op,
              ": grad_out must be float32, bfloat16 or float16, got ", gdt);
  // Mixed dtypes (rare; autograd passes grads in x's dtype): compute on fp32 copies, cast grad_x back.
  const bool mixed = gdt != x.scalar_type();
  Prepared P = prepare(op, mixed ? x.to(at::kFloat) : x, weight, bias, eps, kind, weight_offset, scale,
                       shift, ids, strength, nrows);
  at::Tensor go = mixed ? grad_out.to(at::kFloat).contiguous() : grad_out.contiguous();
  at::Tensor gx = at::empty_like(P.x, at::MemoryFormat::Contiguous);
  Args& a = P.args;
  const int64_t rows = a.B * a.N, K = a.K, d = a.d;
  at::Tensor g_scale = at::zeros({K, d}, P.scale.options());
  at::Tensor g_shift = at::zeros({K, d}, P.scale.options());
  auto result = [&]() {
    return std::make_tuple(mixed ? gx.to(x.scalar_type()) : gx, g_scale, g_shift);
  };
  if (rows == 0) return result();
  a.go = go.data_ptr();
  a.out = gx.data_ptr();
  const Isa isa = cpu_isa();
  const auto dt = P.x.scalar_type();
  const BwdFn fn = dt == at::kFloat ? pick_bwd<F32>(kind, isa)
                   : dt == at::kBFloat16 ? pick_bwd<BF16>(kind, isa) : pick_bwd<F16>(kind, isa);
  const bool parallel = rows > 1 && rows * d >= kParallelMin;
  const int T = parallel ? max_threads() : 1;
  // Per-thread partial sums [T, K, 2, d]; the region may run fewer threads than T (unused stay 0).
  at::Tensor part = at::zeros({T, K, 2, d}, P.scale.options());
  float* pp = part.data_ptr<float>();
#pragma omp parallel num_threads(T) if (parallel)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t r0, r1;
    block_of(rows, t, nt, r0, r1);
    std::vector<float> buf(d);
    if (r1 > r0) fn(a, r0, r1, buf.data(), pp + static_cast<int64_t>(t) * K * 2 * d);
  }
  // Deterministic reduction: thread partials summed in thread order.
  float* ps = g_scale.data_ptr<float>();
  float* pb = g_shift.data_ptr<float>();
  const int64_t kd = K * d;
#pragma omp parallel for schedule(static) if (parallel && T > 1 && kd * T >= kParallelMin)
  for (int64_t j = 0; j < kd; ++j) {
    const int64_t k = j / d, i = j % d;
    float s = 0.0f, b = 0.0f;
    for (int t = 0; t < T; ++t) {
      const float* q = pp + (static_cast<int64_t>(t) * K + k) * 2 * d;
      s += q[i];
      b += q[d + i];
    }
    ps[j] = s;
    pb[j] = b;
  }
  return result();
}

}  // namespace

// Implementations only: the schemas are defined by lineas_fast/ops/__init__.py (torch.library).
TORCH_LIBRARY_IMPL(lineas, CPU, m) {
  m.impl("norm_affine", &norm_affine_cpu);
  m.impl("norm_affine_backward", &norm_affine_backward_cpu);
}

}  // namespace lineas
