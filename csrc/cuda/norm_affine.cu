// lineas::norm_affine forward and backward CUDA kernels, torch-free (raw pointers, CUDA runtime only).
// Semantics: lineas_fast/ops/reference.py. x is [B, N, d] contiguous (B*N rows); batch item b reads
// routing entry r = (b*R) // B with R = nrows[0] read ON DEVICE (no host sync, CUDA-graph safe); entry
// id -1 (or off the table) leaves the row unsteered; a = 1 + s*(scale[id] - 1), c = s*shift[id].
//
// Work split: a block owns one batch item b and a contiguous chunk of its rows (P blocks per item,
// enough to fill the GPU), and processes them one row at a time with all its threads. Each thread owns
// the same columns in every row (vectors i = tid, tid + T, ...), so per-column state (the folded
// coefficients in the forward, the column sums in the backward) lives in per-thread-owned shared memory
// with no barriers; only the row reductions synchronise. Rows are re-read per pass (L1/L2-hot).
//
// Backward: grad_scale/grad_shift without atomics, deterministic: each block writes its s-weighted
// column sums into its own workspace row, then table_grad_kernel sums those rows per entry in a fixed
// order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "launchers.h"

namespace {

using Args = LineasNormAffineArgs;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

// ------------------------------------------------------------------ element types
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// VEC elements moved with one (up to 16-byte) access; the launcher only picks VEC > 1 when d % VEC == 0
// and every row pointer is 16-byte aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// weight / bias elements in their own dtype (read once per column per block, or per element uncached)
__device__ __forceinline__ float load_param(const void* p, int dtype, int64_t i) {
  if (dtype == LINEAS_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == LINEAS_F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// VEC consecutive fp32 values from an aligned (shared or global) float array, in float4 pieces if possible
template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float (&o)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + j);
      o[j] = q.x; o[j + 1] = q.y; o[j + 2] = q.z; o[j + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = p[j];
  }
}

// ------------------------------------------------------------------ steering coefficients
// Routing entry r = (b*R) // B of batch item b (clamped for memory safety only: callers keep 1 <= R <= C).
__device__ __forceinline__ int64_t route_of(const Args& a, int64_t b, int64_t R) {
  const int64_t r = (b * R) / a.B;
  return r < 0 ? 0 : (r >= a.C ? a.C - 1 : r);
}

// Table row of batch item b, or -1 when unsteered (id -1 or off the table: never read outside it).
__device__ __forceinline__ int64_t entry_of(const Args& a, int64_t b, int64_t R) {
  const int64_t id = a.ids[route_of(a, b, R)];
  return (id >= 0 && id < a.K) ? id : -1;
}

struct Steer {
  const float* scale;  // this item's table rows, or nullptr when unsteered
  const float* shift;
  float s;             // strength (0 when unsteered)
};

__device__ __forceinline__ Steer steer_of(const Args& a, int64_t b) {
  const int64_t R = *a.nrows;  // read on the device: routing changes need no host sync
  const int64_t id = entry_of(a, b, R);
  if (id < 0) return {nullptr, nullptr, 0.f};
  return {a.scale + id * a.d, a.shift + id * a.d, a.strength[route_of(a, b, R)]};
}

// g = weight + offset (1 + offset without a weight)
__device__ __forceinline__ float gain(const Args& a, int64_t j) {
  return a.weight ? load_param(a.weight, a.weight_dtype, j) + a.weight_offset : 1.f + a.weight_offset;
}

// out = a*(xhat*g + bias) + c folded to xhat*ag + cb: ag = a*g, cb = a*bias + c
__device__ __forceinline__ void coef(const Args& a, const Steer& st, int64_t j, float& ag, float& cb) {
  float sa = 1.f, c = 0.f;
  if (st.scale) {
    sa = 1.f + st.s * (st.scale[j] - 1.f);
    c = st.s * st.shift[j];
  }
  ag = sa * gain(a, j);
  cb = a.bias ? sa * load_param(a.bias, a.bias_dtype, j) + c : c;
}

__device__ __forceinline__ float coef_ag(const Args& a, const Steer& st, int64_t j) {
  const float sa = st.scale ? 1.f + st.s * (st.scale[j] - 1.f) : 1.f;
  return sa * gain(a, j);
}

// ------------------------------------------------------------------ block reductions (deterministic)
// Sums of NV values over the block; every thread gets the identical result. The xor butterfly gives
// every lane the same bits (fp addition is commutative); warp totals are then added in warp order.
template <int NV>
__device__ __forceinline__ void block_sum(float (&v)[NV], float* red) {
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return;
  __syncthreads();  // the previous reduction's readers are done with red
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int k = 0; k < NV; ++k) red[k * kMaxWarps + (threadIdx.x >> 5)] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    float t = 0.f;
    for (int w = 0; w < nw; ++w) t += red[k * kMaxWarps + w];
    v[k] = t;
  }
}

// Welford/Chan moments (count, mean, sum of squared deviations) for the LayerNorm statistics in one pass.
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean, r = b.n / n;
  return {n, a.mean + delta * r, a.m2 + b.m2 + delta * delta * a.n * r};
}

// Block-wide merge; every thread gets the identical result. Merges are not symmetric in their arguments,
// so the butterfly always merges (lower lane, higher lane) and warp results are merged in warp order.
__device__ __forceinline__ Moments block_moments(Moments m, float* red) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const Moments o{__shfl_xor_sync(0xffffffffu, m.n, off), __shfl_xor_sync(0xffffffffu, m.mean, off),
                    __shfl_xor_sync(0xffffffffu, m.m2, off)};
    m = (lane & off) ? merge(o, m) : merge(m, o);
  }
  const int nw = blockDim.x >> 5;
  if (nw == 1) return m;
  __syncthreads();
  if (lane == 0) {
    const int w = threadIdx.x >> 5;
    red[w] = m.n;
    red[kMaxWarps + w] = m.mean;
    red[2 * kMaxWarps + w] = m.m2;
  }
  __syncthreads();
  Moments t{red[0], red[kMaxWarps], red[2 * kMaxWarps]};
  for (int w = 1; w < nw; ++w) t = merge(t, Moments{red[w], red[kMaxWarps + w], red[2 * kMaxWarps + w]});
  return t;
}

// mean (0 for RMSNorm) and rstd of one row; all threads of the block must call it.
template <typename T, int VEC>
__device__ __forceinline__ void row_stats(const Args& a, const Vec<T, VEC>* xr, int nvec, float* red,
                                          float& mean, float& rstd) {
  const float inv_d = 1.f / static_cast<float>(a.d);
  if (a.kind == LINEAS_RMSNORM) {
    float ss[1] = {0.f};
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, VEC> xv = xr[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float v = to_f32(xv.v[j]);
        ss[0] += v * v;
      }
    }
    block_sum<1>(ss, red);
    mean = 0.f;
    rstd = rsqrtf(ss[0] * inv_d + a.eps);
    return;
  }
  Moments m{0.f, 0.f, 0.f};
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T, VEC> xv = xr[i];
    float v[VEC], s = 0.f, q = 0.f;  // exact two-pass moments of the VEC values, then one merge
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = to_f32(xv.v[j]);
      s += v[j];
    }
    const float mu = s * (1.f / VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) q += (v[j] - mu) * (v[j] - mu);
    m = merge(m, Moments{static_cast<float>(VEC), mu, q});
  }
  m = block_moments(m, red);
  mean = m.mean;
  rstd = rsqrtf(m.m2 * inv_d + a.eps);  // biased variance, as the reference
}

// Rows [first, last) of the block's chunk; batch item b.
struct Chunk {
  int64_t b, first, last;
};

__device__ __forceinline__ Chunk chunk_of(const Args& a, int64_t P) {
  const int64_t b = blockIdx.x / P, p = blockIdx.x % P;
  return {b, b * a.N + p * a.N / P, b * a.N + (p + 1) * a.N / P};
}

// ------------------------------------------------------------------ forward
// cache: fold the coefficients (ag, cb) once per block into dynamic shared memory [2, d] (worth it when
// the block has several rows); otherwise recompute them per element from the (L1-hot) tables.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(Args a, T* __restrict__ out, int64_t P, int cache) {
  extern __shared__ float4 dyn4[];
  __shared__ float red[3 * kMaxWarps];
  float* ag_s = reinterpret_cast<float*>(dyn4);
  float* cb_s = ag_s + a.d;
  const Chunk ck = chunk_of(a, P);
  const Steer st = steer_of(a, ck.b);
  const int nvec = static_cast<int>(a.d / VEC);
  if (cache)
    for (int i = threadIdx.x; i < nvec; i += blockDim.x)
#pragma unroll
      for (int j = 0; j < VEC; ++j) coef(a, st, i * VEC + j, ag_s[i * VEC + j], cb_s[i * VEC + j]);
  for (int64_t row = ck.first; row < ck.last; ++row) {
    const auto* xr = reinterpret_cast<const Vec<T, VEC>*>(static_cast<const T*>(a.x) + row * a.d);
    auto* outr = reinterpret_cast<Vec<T, VEC>*>(out + row * a.d);
    float mean, rstd;
    row_stats<T, VEC>(a, xr, nvec, red, mean, rstd);
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, VEC> xv = xr[i];
      float ag[VEC], cb[VEC];
      if (cache) {
        load_floats<VEC>(ag_s + i * VEC, ag);
        load_floats<VEC>(cb_s + i * VEC, cb);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) coef(a, st, i * VEC + j, ag[j], cb[j]);
      }
      Vec<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ov.v[j] = from_f32<T>((to_f32(xv.v[j]) - mean) * rstd * ag[j] + cb[j]);
      outr[i] = ov;
    }
  }
}

// ------------------------------------------------------------------ backward
// grad_x = rstd*(gy - mean(gy) [LayerNorm] - xhat*mean(gy*xhat)), gy = grad*a*g. Column sums
// Sxh = sum grad*xhat and Sg = sum grad over the chunk (steered items only) become the block's workspace
// row part[blockIdx.x] = [s*(g*Sxh + bias*Sg), s*Sg] (= s*sum grad*y, s*sum grad).
// cache: ag and the sums in dynamic shared memory [3, d]; otherwise ag is recomputed per element and the
// sums accumulate in the block's own workspace row (thread-owned columns: no races either way).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(Args a, const T* __restrict__ go, T* __restrict__ gx,
                                                         float* __restrict__ part, int64_t P, int cache) {
  extern __shared__ float4 dyn4[];
  __shared__ float red[3 * kMaxWarps];
  const int64_t d = a.d;
  float* ag_s = reinterpret_cast<float*>(dyn4);
  float* prow = part + static_cast<int64_t>(blockIdx.x) * 2 * d;
  float* acc = cache ? ag_s + d : prow;  // [Sxh: d][Sg: d]
  const Chunk ck = chunk_of(a, P);
  const Steer st = steer_of(a, ck.b);
  const bool steered = st.scale != nullptr;
  const int nvec = static_cast<int>(d / VEC);
  const float inv_d = 1.f / static_cast<float>(d);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = i * VEC + j;
      if (cache) ag_s[c] = coef_ag(a, st, c);
      if (steered) acc[c] = acc[d + c] = 0.f;
    }
  for (int64_t row = ck.first; row < ck.last; ++row) {
    const auto* xr = reinterpret_cast<const Vec<T, VEC>*>(static_cast<const T*>(a.x) + row * d);
    const auto* gr = reinterpret_cast<const Vec<T, VEC>*>(go + row * d);
    auto* gxr = reinterpret_cast<Vec<T, VEC>*>(gx + row * d);
    float mean, rstd;
    row_stats<T, VEC>(a, xr, nvec, red, mean, rstd);
    float sums[2] = {0.f, 0.f};  // sum gy*xhat, sum gy
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, VEC> xv = xr[i], gv = gr[i];
      float ag[VEC];
      if (cache) load_floats<VEC>(ag_s + i * VEC, ag);
      else
#pragma unroll
        for (int j = 0; j < VEC; ++j) ag[j] = coef_ag(a, st, i * VEC + j);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gy = to_f32(gv.v[j]) * ag[j];
        sums[0] += gy * (to_f32(xv.v[j]) - mean) * rstd;
        sums[1] += gy;
      }
    }
    block_sum<2>(sums, red);
    const float inner = sums[0] * inv_d;
    const float mgy = a.kind == LINEAS_RMSNORM ? 0.f : sums[1] * inv_d;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, VEC> xv = xr[i], gv = gr[i];
      float ag[VEC];
      if (cache) load_floats<VEC>(ag_s + i * VEC, ag);
      else
#pragma unroll
        for (int j = 0; j < VEC; ++j) ag[j] = coef_ag(a, st, i * VEC + j);
      Vec<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = to_f32(gv.v[j]), xhat = (to_f32(xv.v[j]) - mean) * rstd;
        ov.v[j] = from_f32<T>(rstd * (g * ag[j] - mgy - xhat * inner));
        if (steered) {
          acc[i * VEC + j] += g * xhat;
          acc[d + i * VEC + j] += g;
        }
      }
      gxr[i] = ov;
    }
  }
  if (!steered) return;  // table_grad_kernel skips unsteered items: their row stays unwritten
  for (int i = threadIdx.x; i < nvec; i += blockDim.x)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = i * VEC + j;
      const float sxh = acc[c], sg = acc[d + c];
      const float beta = a.bias ? load_param(a.bias, a.bias_dtype, c) : 0.f;
      prow[c] = st.s * (gain(a, c) * sxh + beta * sg);
      prow[d + c] = st.s * sg;
    }
}

// grad_scale[k] / grad_shift[k] = sum of the workspace rows of the items routed to entry k, in item then
// block order (deterministic). One thread per (column, entry); rows of other entries are skipped.
__global__ void table_grad_kernel(Args a, const float* __restrict__ part, int64_t P, float* __restrict__ g_scale,
                                  float* __restrict__ g_shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.d) return;
  const int64_t R = *a.nrows, d = a.d;
  for (int64_t k = blockIdx.y; k < a.K; k += gridDim.y) {
    float sy = 0.f, sg = 0.f;
    for (int64_t b = 0; b < a.B; ++b) {
      if (entry_of(a, b, R) != k) continue;
      for (int64_t p = 0; p < P; ++p) {
        const float* row = part + (b * P + p) * 2 * d;
        sy += row[c];
        sg += row[d + c];
      }
    }
    g_scale[k * d + c] = sy;
    g_shift[k * d + c] = sg;
  }
}

// ------------------------------------------------------------------ host side
struct Plan {
  int threads;   // per block
  int64_t P;     // blocks per batch item
  int cache;     // shared-memory cache on/off
  size_t smem;   // dynamic shared memory bytes
};

int vec_width(int dtype) { return dtype == LINEAS_F32 ? 4 : 8; }  // 16-byte accesses

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Kernels whose static + dynamic shared memory exceeds 48 KiB must opt in (a host-side attribute, fine
// under stream capture). kStaticSmem: the reduction scratch `red`.
constexpr size_t kStaticSmem = 3 * kMaxWarps * sizeof(float);

template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  return smem + kStaticSmem > 48 * 1024
             ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))
             : cudaSuccess;
}

// Threads: ~2 vectors per thread (two loads in flight), a multiple of 32, at most kMaxThreads. Blocks:
// enough to fill every SM at the kernel's occupancy. cache_floats: per-column fp32 words the cache needs.
// `kernel` is the vectorised instantiation (occupancy); the plan depends only on dtype, shape and device,
// so the backward's workspace query and launch agree.
template <typename K>
cudaError_t make_plan(K kernel, const Args& a, int cache_floats, Plan& plan) {
  const int64_t nvec = (a.d + vec_width(a.dtype) - 1) / vec_width(a.dtype);
  const int64_t want = ((nvec + 1) / 2 + 31) / 32 * 32;
  plan.threads = static_cast<int>(want < 32 ? 32 : (want > kMaxThreads ? kMaxThreads : want));
  int dev = 0, sms = 0, optin = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  const size_t cache_bytes = static_cast<size_t>(cache_floats) * static_cast<size_t>(a.d) * sizeof(float);
  const bool fits = cache_bytes + kStaticSmem <= static_cast<size_t>(optin);
  plan.smem = fits ? cache_bytes : 0;
  if ((e = allow_smem(kernel, plan.smem)) != cudaSuccess) return e;  // before the occupancy query
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.threads, plan.smem);
  if (e != cudaSuccess) return e;
  const int64_t target = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  int64_t P = (target + a.B - 1) / a.B;
  P = P < 1 ? 1 : (P > a.N ? a.N : P);
  if (a.B > INT_MAX / P) return cudaErrorInvalidValue;  // grid.x limit
  plan.P = P;
  plan.cache = fits && a.N / P >= 2;  // one row per block: folding the coefficients first does not pay
  if (!plan.cache) plan.smem = 0;
  return cudaSuccess;
}

template <typename T>
cudaError_t fwd_typed(const Args& a, void* out, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  Plan plan{};
  cudaError_t e = make_plan(fwd_kernel<T, V>, a, 2, plan);
  if (e != cudaSuccess) return e;
  const bool vec = a.d % V == 0 && aligned16(a.x) && aligned16(out);
  auto kernel = vec ? fwd_kernel<T, V> : fwd_kernel<T, 1>;
  if ((e = allow_smem(kernel, plan.smem)) != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(a.B * plan.P), plan.threads, plan.smem, stream>>>(a, static_cast<T*>(out),
                                                                                  plan.P, plan.cache);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_plan(const Args& a, Plan& plan) {
  return make_plan(bwd_kernel<T, 16 / sizeof(T)>, a, 3, plan);
}

cudaError_t bwd_plan_any(const Args& a, Plan& plan) {
  switch (a.dtype) {
    case LINEAS_F32: return bwd_plan<float>(a, plan);
    case LINEAS_BF16: return bwd_plan<__nv_bfloat16>(a, plan);
    case LINEAS_F16: return bwd_plan<__half>(a, plan);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t bwd_typed(const Args& a, const Plan& plan, const void* grad_out, void* grad_x, float* g_scale,
                      float* g_shift, float* workspace, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.d % V == 0 && aligned16(a.x) && aligned16(grad_out) && aligned16(grad_x);
  auto kernel = vec ? bwd_kernel<T, V> : bwd_kernel<T, 1>;
  cudaError_t e = allow_smem(kernel, plan.smem);
  if (e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(a.B * plan.P), plan.threads, plan.smem, stream>>>(
      a, static_cast<const T*>(grad_out), static_cast<T*>(grad_x), workspace, plan.P, plan.cache);
  if ((e = cudaGetLastError()) != cudaSuccess || a.K == 0) return e;
  const dim3 grid(static_cast<unsigned>((a.d + 255) / 256), static_cast<unsigned>(a.K < 65535 ? a.K : 65535));
  table_grad_kernel<<<grid, 256, 0, stream>>>(a, workspace, plan.P, g_scale, g_shift);
  return cudaGetLastError();
}

bool valid(const Args& a) {
  return a.x && a.ids && a.strength && a.nrows && a.B > 0 && a.N > 0 && a.d > 0 && a.d <= INT_MAX / 2 &&
         a.C > 0 && a.K >= 0 && (a.K == 0 || (a.scale && a.shift)) &&
         (a.kind == LINEAS_LAYERNORM || a.kind == LINEAS_RMSNORM);
}

}  // namespace

cudaError_t lineas_norm_affine_fwd_launch(const LineasNormAffineArgs& a, void* out, cudaStream_t stream) {
  if (!valid(a) || !out) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case LINEAS_F32: return fwd_typed<float>(a, out, stream);
    case LINEAS_BF16: return fwd_typed<__nv_bfloat16>(a, out, stream);
    case LINEAS_F16: return fwd_typed<__half>(a, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lineas_norm_affine_bwd_workspace(const LineasNormAffineArgs& a, int64_t* floats) {
  if (!valid(a) || !floats) return cudaErrorInvalidValue;
  Plan plan{};
  const cudaError_t e = bwd_plan_any(a, plan);
  if (e == cudaSuccess) *floats = a.B * plan.P * 2 * a.d;
  return e;
}

cudaError_t lineas_norm_affine_bwd_launch(const LineasNormAffineArgs& a, const void* grad_out, void* grad_x,
                                          float* grad_scale, float* grad_shift, float* workspace,
                                          int64_t workspace_floats, cudaStream_t stream) {
  if (!valid(a) || !grad_out || !grad_x || !workspace || (a.K > 0 && (!grad_scale || !grad_shift)))
    return cudaErrorInvalidValue;
  Plan plan{};
  cudaError_t e = bwd_plan_any(a, plan);
  if (e != cudaSuccess) return e;
  if (workspace_floats < a.B * plan.P * 2 * a.d) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case LINEAS_F32: return bwd_typed<float>(a, plan, grad_out, grad_x, grad_scale, grad_shift, workspace, stream);
    case LINEAS_BF16:
      return bwd_typed<__nv_bfloat16>(a, plan, grad_out, grad_x, grad_scale, grad_shift, workspace, stream);
    case LINEAS_F16: return bwd_typed<__half>(a, plan, grad_out, grad_x, grad_scale, grad_shift, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}
