// Host-side API of the `noise_precondition` op:
//   epg_C::noise_precondition(Tensor x0, Tensor eps, Tensor sigma, float sigma_data,
//                             float sigma_min, str mode)
//       -> (Tensor x_in, Tensor c_in, Tensor c_skip, Tensor c_out, Tensor t_cond)
// x0, eps: (B, ...) of one dtype (float32/64, bfloat16, float16); sigma: (B,)
// float32/64. x_in has x0's shape and dtype; the scalings are edm_scalings(sigma).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "edm_scalings.h"

namespace epg {

using NoisePreconditionOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// noise_precondition.cpp: validates shapes, dtypes, devices and mode; returns the mode.
EdmMode noise_precondition_check_args(const at::Tensor& x0, const at::Tensor& eps,
                                      const at::Tensor& sigma, c10::string_view mode);

NoisePreconditionOut noise_precondition_meta(const at::Tensor& x0, const at::Tensor& eps,
                                             const at::Tensor& sigma, double sigma_data,
                                             double sigma_min, c10::string_view mode);

// noise_precondition_cpu.cpp
NoisePreconditionOut noise_precondition_cpu(const at::Tensor& x0, const at::Tensor& eps,
                                            const at::Tensor& sigma, double sigma_data,
                                            double sigma_min, c10::string_view mode);

#ifdef EPG_WITH_CUDA
// noise_precondition_cuda.cu
NoisePreconditionOut noise_precondition_cuda(const at::Tensor& x0, const at::Tensor& eps,
                                             const at::Tensor& sigma, double sigma_data,
                                             double sigma_min, c10::string_view mode);
#endif

}  // namespace epg
