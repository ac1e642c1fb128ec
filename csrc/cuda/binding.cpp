// Python module `lineas_fast._C_cuda`: thin torch binding for the torch-free kernels in *.cu.
// It only adds CUDA implementations; the op schemas are defined by `lineas_fast._C`, which must be
// imported first.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "launchers.h"

namespace {

at::Tensor affine_rows_cuda(const at::Tensor& x_in, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& strength) {
  TORCH_CHECK(x_in.dim() >= 1, "lineas::affine_rows: x must have at least 1 dim");
  const auto dt = x_in.scalar_type();
  const int code = dt == at::kFloat ? 0 : dt == at::kBFloat16 ? 1 : dt == at::kHalf ? 2 : -1;
  TORCH_CHECK(code >= 0, "lineas::affine_rows: x must be float32, bfloat16 or float16, got ", dt);
  const int64_t d = x_in.size(-1);
  const int64_t B = x_in.dim() >= 2 ? x_in.size(0) : 1;
  for (const auto* t : {&scale, &shift}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == d,
                "lineas::affine_rows: scale/shift must be float32 of shape [", d, "]");
  }
  TORCH_CHECK(strength.scalar_type() == at::kFloat && strength.dim() == 1 && strength.size(0) == B,
              "lineas::affine_rows: strength must be float32 of shape [", B, "]");
  for (const auto* t : {&scale, &shift, &strength}) {
    TORCH_CHECK(t->device() == x_in.device(), "lineas::affine_rows: all tensors must be on ",
                x_in.device());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  at::Tensor sc = scale.contiguous(), sh = shift.contiguous(), st = strength.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  if (rows == 0) return y;
  const cudaError_t err = lineas_affine_rows_launch(
      x.data_ptr(), y.data_ptr(), sc.data_ptr<float>(), sh.data_ptr<float>(),
      st.data_ptr<float>(), rows, rows / B, d, code, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lineas::affine_rows CUDA launch failed: ",
              cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lineas, CUDA, m) { m.impl("affine_rows", &affine_rows_cuda); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lineas_fast CUDA kernels (implementations of torch.ops.lineas.*)";
}
