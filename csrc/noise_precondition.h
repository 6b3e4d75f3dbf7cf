// Shared math for the `noise_precondition` op (torch-free; CPU and CUDA kernels).
//
// For sample b with (already resolution-shifted) noise level sigma_b:
//   x_in = c_in(sigma_b) * (x0 + sigma_b * eps)          elementwise over the sample
// and the per-sample scalings (c_in, c_skip, c_out, t_cond) of edm_scalings.h.
//
// Precision: the scalings are computed in sigma's dtype (edm_scalings_point),
// then sigma_b and c_in are converted to acc_t<T> of the image dtype T; x_in is
// evaluated in acc_t<T> with each product and sum rounded separately (as the
// reference's torch ops do) and rounded to T once.
#pragma once

#include "macros.h"
#include "numerics.h"

namespace epg {

template <typename A>
EPG_HD_INLINE A noise_precondition_point(A x0, A eps, A sigma, A c_in) {
  return mul_rn(add_rn(x0, mul_rn(sigma, eps)), c_in);
}

}  // namespace epg
