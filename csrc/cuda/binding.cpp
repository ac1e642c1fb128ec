// Python module `lineas_fast._C_cuda`: thin torch binding for the torch-free kernels in *.cu.
// It only adds CUDA implementations (validation, allocation, the current stream); the op schemas are
// defined elsewhere (in Python by `lineas_fast.ops`, which imports this module after defining them).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>
#include <utility>

#include "launchers.h"

namespace {

// ------------------------------------------------------------------ norm_affine (norm_affine.cu)
int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? LINEAS_F32 : t == at::kBFloat16 ? LINEAS_BF16 : t == at::kHalf ? LINEAS_F16 : -1;
}

// Contiguous operands (kept alive here) and the launcher's view of them. No host<->device sync: ids and
// nrows are only read by the kernels (out-of-range ids are treated as unsteered there).
struct NormAffineOperands {
  at::Tensor x, weight, bias, scale, shift, ids, strength, nrows;
  LineasNormAffineArgs args{};
};

// weight / bias: optional floating [d]; fp32/bf16/fp16 are read as they are, other dtypes go to fp32.
at::Tensor param(const char* op, const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                 int& code) {
  code = LINEAS_F32;
  if (!t.has_value()) return at::Tensor();
  const int64_t d = x.size(-1);
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()) && t->dim() == 1 && t->size(0) == d, op, ": ", name,
              " must be a floating tensor of shape [", d, "] (x.size(-1)), got ", t->scalar_type(), " ",
              t->sizes());
  at::Tensor c = (dtype_code(t->scalar_type()) < 0 ? t->to(at::kFloat) : *t).contiguous();
  code = dtype_code(c.scalar_type());
  return c;
}

NormAffineOperands prepare(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, int64_t kind, double weight_offset,
                           const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& ids,
                           const at::Tensor& strength, const at::Tensor& nrows) {
  TORCH_CHECK(x.is_cuda(), op, ": CUDA kernel got x on ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got a scalar");
  TORCH_CHECK(dtype_code(x.scalar_type()) >= 0, op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(kind == LINEAS_LAYERNORM || kind == LINEAS_RMSNORM, op, ": kind=", kind,
              ": expected 0 (LayerNorm) or 1 (RMSNorm)");
  const int64_t d = x.size(-1);
  const std::pair<const at::Tensor*, const char*> named[] = {
      {&scale, "scale"}, {&shift, "shift"}, {&ids, "ids"}, {&strength, "strength"}, {&nrows, "nrows"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  }
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()) && at::isFloatingType(shift.scalar_type()), op,
              ": scale/shift must be floating (float32 preferred), got ", scale.scalar_type(), " and ",
              shift.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.size(1) == d && shift.sizes() == scale.sizes(), op,
              ": scale/shift must both have shape [K, d] with d = x.size(-1) = ", d, ", got ", scale.sizes(),
              " and ", shift.sizes());
  TORCH_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false) && ids.dim() == 1 && ids.size(0) >= 1,
              op, ": ids must be a non-empty 1-D integer (int64) tensor, got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(at::isFloatingType(strength.scalar_type()) && strength.sizes() == ids.sizes(), op,
              ": strength must be a floating (float32) tensor of shape ", ids.sizes(), " (like ids), got ",
              strength.scalar_type(), " ", strength.sizes());
  TORCH_CHECK(at::isIntegralType(nrows.scalar_type(), /*includeBool=*/false) && nrows.numel() == 1, op,
              ": nrows must be an integer (int64) tensor with one element, got ", nrows.scalar_type(), " ",
              nrows.sizes());
  NormAffineOperands o;
  LineasNormAffineArgs& a = o.args;
  o.weight = param(op, weight, "weight", x, a.weight_dtype);
  o.bias = param(op, bias, "bias", x, a.bias_dtype);
  // .to() and .contiguous() return the tensor itself when nothing changes (the usual case: no copy)
  o.x = x.contiguous();
  o.scale = scale.to(at::kFloat).contiguous();
  o.shift = shift.to(at::kFloat).contiguous();
  o.ids = ids.to(at::kLong).contiguous();
  o.strength = strength.to(at::kFloat).contiguous();
  o.nrows = nrows.to(at::kLong).contiguous();
  a.x = o.x.data_ptr();
  a.weight = o.weight.defined() ? o.weight.data_ptr() : nullptr;
  a.bias = o.bias.defined() ? o.bias.data_ptr() : nullptr;
  a.K = scale.size(0);
  a.scale = a.K ? o.scale.data_ptr<float>() : nullptr;
  a.shift = a.K ? o.shift.data_ptr<float>() : nullptr;
  a.ids = o.ids.data_ptr<int64_t>();
  a.strength = o.strength.data_ptr<float>();
  a.nrows = o.nrows.data_ptr<int64_t>();
  a.d = d;
  a.B = x.dim() >= 2 ? x.size(0) : 1;
  a.N = a.B * d == 0 ? 0 : x.numel() / (a.B * d);
  a.C = ids.size(0);
  a.eps = static_cast<float>(eps);
  a.weight_offset = static_cast<float>(weight_offset);
  a.kind = static_cast<int>(kind);
  a.dtype = dtype_code(x.scalar_type());
  return o;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor norm_affine_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps, int64_t kind, double weight_offset,
                            const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& ids,
                            const at::Tensor& strength, const at::Tensor& nrows) {
  const char* op = "lineas::norm_affine";
  const c10::cuda::CUDAGuard guard(x.device());
  NormAffineOperands o = prepare(op, x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength, nrows);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  check_launch(op, lineas_norm_affine_fwd_launch(o.args, out.data_ptr(),
                                                 c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_affine_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t kind, double weight_offset, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& ids, const at::Tensor& strength, const at::Tensor& nrows) {
  const char* op = "lineas::norm_affine_backward";
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ",
              x.device());
  TORCH_CHECK(dtype_code(grad_out.scalar_type()) >= 0, op, ": grad_out must be float32, bfloat16 or float16, got ",
              grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  // Mixed dtypes (rare; autograd passes grads in x's dtype): compute on fp32 copies, cast grad_x back.
  const bool mixed = grad_out.scalar_type() != x.scalar_type();
  NormAffineOperands o = prepare(op, mixed ? x.to(at::kFloat) : x, weight, bias, eps, kind, weight_offset, scale,
                                 shift, ids, strength, nrows);
  at::Tensor go = (mixed ? grad_out.to(at::kFloat) : grad_out).contiguous();
  at::Tensor gx = at::empty(o.x.sizes(), o.x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto f32 = o.x.options().dtype(at::kFloat);
  auto result = [&](at::Tensor gs, at::Tensor gb) {
    return std::make_tuple(mixed ? gx.to(x.scalar_type()) : gx, gs, gb);
  };
  if (gx.numel() == 0) return result(at::zeros(scale.sizes(), f32), at::zeros(shift.sizes(), f32));
  at::Tensor g_scale = at::empty(scale.sizes(), f32), g_shift = at::empty(shift.sizes(), f32);  // all written
  int64_t floats = 0;
  check_launch(op, lineas_norm_affine_bwd_workspace(o.args, &floats));
  at::Tensor work = at::empty({floats}, f32);
  check_launch(op, lineas_norm_affine_bwd_launch(
                       o.args, go.data_ptr(), gx.data_ptr(), o.args.K ? g_scale.data_ptr<float>() : nullptr,
                       o.args.K ? g_shift.data_ptr<float>() : nullptr, work.data_ptr<float>(), floats,
                       c10::cuda::getCurrentCUDAStream().stream()));
  return result(g_scale, g_shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(lineas, CUDA, m) {
  m.impl("norm_affine", &norm_affine_cuda);
  m.impl("norm_affine_backward", &norm_affine_backward_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lineas_fast CUDA kernels (implementations of torch.ops.lineas.*)";
}
