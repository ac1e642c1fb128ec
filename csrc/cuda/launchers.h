// Torch-free host launchers for the CUDA kernels in csrc/cuda/*.cu (raw pointers + a stream).
// Each returns the cudaError_t of its launch. Included by the .cu files and by binding.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

// ------------------------------------------------------------------ lineas::norm_affine (norm_affine.cu)
// Plain C++ (not extern "C"): raw device pointers, no torch, no exceptions; each returns a cudaError_t.
enum LineasDtype : int { LINEAS_F32 = 0, LINEAS_BF16 = 1, LINEAS_F16 = 2 };
enum LineasNormKind : int { LINEAS_LAYERNORM = 0, LINEAS_RMSNORM = 1 };

// Operands of norm_affine (semantics: lineas_fast/ops/reference.py). All pointers are contiguous device
// memory on the current device; x is [B, N, d] in `dtype`.
struct LineasNormAffineArgs {
  const void* x;              // [B*N, d], dtype
  const void* weight;         // [d] in weight_dtype, or nullptr (gain 1 + weight_offset)
  const void* bias;           // [d] in bias_dtype, or nullptr
  const float* scale;         // [K, d] steering table (may be nullptr when K == 0)
  const float* shift;         // [K, d]
  const int64_t* ids;         // [C] entry ids; -1 (or outside 0..K-1) = unsteered
  const float* strength;      // [C]
  const int64_t* nrows;       // [1] R, read on the device only (no host sync, CUDA-graph safe)
  int64_t B, N, d, K, C;      // B, N, d, C >= 1; K >= 0
  float eps, weight_offset;
  int kind;                   // LineasNormKind
  int dtype;                  // LineasDtype of x (and out / grad_out / grad_x)
  int weight_dtype, bias_dtype;  // LineasDtype of weight / bias
};

// out [B*N, d] in x's dtype.
cudaError_t lineas_norm_affine_fwd_launch(const LineasNormAffineArgs& a, void* out, cudaStream_t stream);

// Backward: *floats = the fp32 workspace the launch needs (it depends on the current device).
cudaError_t lineas_norm_affine_bwd_workspace(const LineasNormAffineArgs& a, int64_t* floats);

// grad_x [B*N, d] in x's dtype (grad_out too); grad_scale, grad_shift fp32 [K, d], every element written.
// workspace: >= the queried number of floats, no initialisation needed.
cudaError_t lineas_norm_affine_bwd_launch(const LineasNormAffineArgs& a, const void* grad_out, void* grad_x,
                                          float* grad_scale, float* grad_shift, float* workspace,
                                          int64_t workspace_floats, cudaStream_t stream);
