// Torch-free host launchers for the CUDA kernels in csrc/cuda/*.cu (raw pointers + a stream).
// Each returns the cudaError_t of its launch. Included by the .cu files and by binding.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

extern "C" {

// y = x + s_b * (scale * x + shift - x) over `rows` rows of length d; row r uses
// strength[r / rows_per_b]. dtype: 0 = float32, 1 = bfloat16, 2 = float16 (x and y);
// scale, shift, strength are float32. All pointers are contiguous device memory.
cudaError_t lineas_affine_rows_launch(const void* x, void* y, const float* scale,
                                      const float* shift, const float* strength, int64_t rows,
                                      int64_t rows_per_b, int64_t d, int dtype,
                                      cudaStream_t stream);

}  // extern "C"
