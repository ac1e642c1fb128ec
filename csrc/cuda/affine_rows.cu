// lineas::affine_rows CUDA kernel, torch-free (raw pointers). Same maths as csrc/affine_rows.cpp:
//   y = x + s_b * (scale * x + shift - x), fp32 compute, output in x's dtype.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace {

struct F32 {
  using T = float;
  __device__ static float load(T v) { return v; }
  __device__ static T store(float f) { return f; }
};

struct BF16 {  // bit-shift conversion, round to nearest even (NaN kept quiet)
  using T = unsigned short;
  __device__ static float load(T v) { return __uint_as_float(static_cast<unsigned>(v) << 16); }
  __device__ static T store(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<T>((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<T>(u >> 16);
  }
};

struct F16 {
  using T = __half;
  __device__ static float load(T v) { return __half2float(v); }
  __device__ static T store(float f) { return __float2half_rn(f); }
};

// One block per row (grid-stride over rows), threads stride over the row's d elements.
template <typename C>
__global__ void affine_rows_kernel(const typename C::T* __restrict__ x, typename C::T* __restrict__ y,
                                   const float* __restrict__ scale, const float* __restrict__ shift,
                                   const float* __restrict__ strength, int64_t rows,
                                   int64_t rows_per_b, int64_t d) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float s = strength[r / rows_per_b];
    const typename C::T* xr = x + r * d;
    typename C::T* yr = y + r * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = C::load(xr[i]);
      yr[i] = C::store(v + s * (scale[i] * v + shift[i] - v));
    }
  }
}

template <typename C>
cudaError_t launch(const void* x, void* y, const float* scale, const float* shift,
                   const float* strength, int64_t rows, int64_t rows_per_b, int64_t d,
                   cudaStream_t stream) {
  const int threads = d >= 1024 ? 256 : (d >= 256 ? 128 : 64);
  const int64_t max_blocks = 65535;
  const unsigned blocks = static_cast<unsigned>(rows < max_blocks ? rows : max_blocks);
  affine_rows_kernel<C><<<blocks, threads, 0, stream>>>(
      static_cast<const typename C::T*>(x), static_cast<typename C::T*>(y), scale, shift, strength,
      rows, rows_per_b, d);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t lineas_affine_rows_launch(const void* x, void* y, const float* scale,
                                                 const float* shift, const float* strength,
                                                 int64_t rows, int64_t rows_per_b, int64_t d,
                                                 int dtype, cudaStream_t stream) {
  if (rows <= 0 || d <= 0) return cudaSuccess;
  if (rows_per_b <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch<F32>(x, y, scale, shift, strength, rows, rows_per_b, d, stream);
    case 1: return launch<BF16>(x, y, scale, shift, strength, rows, rows_per_b, d, stream);
    case 2: return launch<F16>(x, y, scale, shift, strength, rows, rows_per_b, d, stream);
    default: return cudaErrorInvalidValue;
  }
}
