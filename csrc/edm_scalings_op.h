// Host-side API of the `edm_scalings` op: argument handling shared by all
// backends and the per-backend entry points that registration.cpp binds to
//   epg_C::edm_scalings(Tensor sigma, float sigma_data, float sigma_min,
//                       str mode) -> (Tensor c_in, Tensor c_skip,
//                                     Tensor c_out, Tensor t_cond)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "edm_scalings.h"

namespace epg {

using EdmScalingsOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---- shared helpers (edm_scalings.cpp) ------------------------------------

// "x0" -> kX0, "edm" -> kEdm; anything else raises naming both choices.
EdmMode edm_parse_mode(c10::string_view mode);

// Validates `sigma` (1-D, float32/float64) and `mode`; returns the mode.
EdmMode edm_check_args(const at::Tensor& sigma, c10::string_view mode);

// Four new contiguous tensors with sigma's shape, dtype and device.
EdmScalingsOut edm_empty_outputs(const at::Tensor& sigma);

// ---- backend entry points ---------------------------------------------------

// edm_scalings_cpu.cpp
EdmScalingsOut edm_scalings_cpu(const at::Tensor& sigma, double sigma_data,
                                double sigma_min, c10::string_view mode);

// edm_scalings.cpp: validates and allocates only (fake / meta tensors,
// torch.compile, torch.library.opcheck).
EdmScalingsOut edm_scalings_meta(const at::Tensor& sigma, double sigma_data,
                                 double sigma_min, c10::string_view mode);

#ifdef EPG_WITH_CUDA
// edm_scalings_cuda.cu
EdmScalingsOut edm_scalings_cuda(const at::Tensor& sigma, double sigma_data,
                                 double sigma_min, c10::string_view mode);
#endif

}  // namespace epg
