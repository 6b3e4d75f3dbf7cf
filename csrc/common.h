// Argument checks and small host-side helpers shared by all ops.
//
// Keep this header light: it is included from .cu files, so it must not pull
// in torch/extension.h, ATen/ATen.h or ATen/cuda/CUDAContext.h (those add a
// minute of nvcc time per translation unit).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
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

// `t` must be float32, float64, bfloat16 or float16 (the dtypes of image-sized
// tensors: data in float32/64, network outputs in bf16/fp16 under autocast).
inline bool is_kernel_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

inline void check_kernel_float(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), op, ": expected `", arg,
              "` to have dtype torch.float32, torch.float64, torch.bfloat16 or "
              "torch.float16, but got ", dtype_name(t.scalar_type()));
}

// `t` must live on `device` (the device of the op's first tensor argument).
inline void check_same_device(const at::Tensor& t, const at::Device& device, const char* op,
                              const char* arg, const char* first) {
  TORCH_CHECK(t.device() == device, op, ": expected `", arg, "` on the device of `", first,
              "` (", device, "), but got ", t.device());
}

// Backend entry points: every tensor argument must be on the kernel's device type.
inline void check_backend_device(const at::Tensor& t, bool cuda, const char* op,
                                 const char* arg) {
  if (cuda) {
    TORCH_CHECK(t.device().is_cuda(), op, " (CUDA kernel): expected `", arg,
                "` on a CUDA device, but got ", t.device());
  } else {
    TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): expected `", arg,
                "` on the CPU, but got ", t.device());
  }
}

// Whether `a` and `b` have the same (possibly symbolic) shape.
inline bool same_shape(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (!(a.sym_size(i) == b.sym_size(i))) return false;
  }
  return true;
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

// Calls f(scalar_t{}) for float32 / float64 / bfloat16 / float16 tensors.
template <typename F>
inline void dispatch_kernel_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default:
      TORCH_CHECK(false, op, ": expected dtype torch.float32, torch.float64, torch.bfloat16 or "
                  "torch.float16, but got ", dtype_name(st));
  }
}

// Calls f(word_t{}) with the unsigned integer type of the element size (1, 2, 4 or 8 bytes);
// layout-only kernels move elements as raw words, whatever their dtype.
template <typename F>
inline void dispatch_element_size(int64_t size, const char* op, F&& f) {
  switch (size) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default:
      TORCH_CHECK(false, op, ": expected a dtype of 1, 2, 4 or 8 bytes per element, but got ",
                  size, " bytes");
  }
}

}  // namespace epg
