// Argument checks and small host-side helpers shared by all ops.
//
// Keep this header light: it is included from .cu files, so it must not pull
// in torch/extension.h, ATen/ATen.h or ATen/cuda/CUDAContext.h (those add a
// minute of nvcc time per translation unit).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace epg {

// Elements per at::parallel_for task for cheap elementwise CPU kernels (same
// value as ATen's internal GRAIN_SIZE, which lives in the heavy
// ATen/TensorIterator.h).
constexpr int64_t kCpuGrainSize = 32768;

// Name of a dtype as Python spells it ("torch.float32"), for error messages.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// `t` must be float32 or float64.
inline void check_float_or_double(const at::Tensor& t, const char* op,
                                  const char* arg) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": expected `", arg,
              "` to have dtype torch.float32 or torch.float64, but got ",
              dtype_name(st));
}

// `t` must have `dim` dimensions; `shape` describes them, e.g. "(B,)".
// Uses sym_sizes() so that it also works on fake tensors with symbolic shapes.
inline void check_dim(const at::Tensor& t, int64_t dim, const char* op,
                      const char* arg, const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": expected `", arg, "` to be a ", dim,
              "-D tensor of shape ", shape, ", but got a ", t.dim(),
              "-D tensor of shape ", t.sym_sizes());
}

// Calls f(scalar_t{}) for float32 / float64 tensors. Both the CPU and CUDA
// kernels use this instead of AT_DISPATCH_* to keep the .cu includes light.
template <typename F>
inline void dispatch_float_double(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default:
      TORCH_CHECK(false, op, ": expected dtype torch.float32 or torch.float64, but got ",
                  dtype_name(st));
  }
}

}  // namespace epg
