// Shared math for the `edm_scalings` op (EDM preconditioning as used by EPG).
//
// This is the ONLY place where the formulas live; the CPU kernel
// (edm_scalings_cpu.cpp) and the CUDA kernel (edm_scalings_cuda.cu) both call
// edm_scalings_point(). The header is torch-free and compiles with plain
// g++/clang++ as well as with nvcc.
//
// For a per-sample noise level sigma (already resolution-shifted):
//   c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
//   t_cond = 250 * log(sigma + 1e-44)
//   mode x0 : c_skip = 0
//             c_out  = 1
//   mode edm: c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
//             c_out  = (sigma - sigma_min) * sigma_data / sqrt(sigma^2 + sigma_data^2)
//
// Precision: c_in, c_skip and c_out are computed in the input dtype T
// (float32 inputs stay float32), each product and sum rounded on its own
// (mul_rn / add_rn / sub_rn of numerics.h): nvcc would otherwise contract
// sigma*sigma + sd2 and d*d + sd2 into fused multiply-adds, and the CUDA
// scalings (and hence noise_precondition's x_in, which multiplies by c_in)
// would differ from the CPU kernel's in the last bit. t_cond is ALWAYS
// computed in double and then rounded to T: 1e-44 is a denormal in float32
// (smallest normal is ~1.18e-38), so a float32 `sigma + 1e-44f` would be
// inexact and becomes 0 (log -> -inf) whenever denormals are flushed to zero
// (CUDA -ftz / --use_fast_math, CPU DAZ/FTZ modes). In double, 1e-44 is a
// normal number, so sigma = 0 gives t_cond = 250*log(1e-44) = -25328.436...
// for both dtypes, which is finite in float32 as well. This also makes the
// float32 t_cond the correctly rounded value of the float64 formula.
#pragma once

#include <math.h>

#include "macros.h"
#include "numerics.h"

namespace epg {

// Preconditioning variant; parsed from the op's `mode` string on the host.
enum class EdmMode : int {
  kX0 = 0,   // network predicts x0 directly: c_skip = 0, c_out = 1
  kEdm = 1,  // Karras et al. EDM skip/out scalings with a sigma_min offset
};

template <typename T>
struct EdmScalings {
  T c_in;
  T c_skip;
  T c_out;
  T t_cond;
};

namespace detail {
EPG_HD_INLINE float edm_sqrt(float x) { return ::sqrtf(x); }
EPG_HD_INLINE double edm_sqrt(double x) { return ::sqrt(x); }
}  // namespace detail

// t_cond = 250 * log(sigma + 1e-44), evaluated in double (see above).
template <typename T>
EPG_HD_INLINE T edm_t_cond(T sigma) {
  return static_cast<T>(250.0 * ::log(static_cast<double>(sigma) + 1e-44));
}

template <typename T>
EPG_HD_INLINE EdmScalings<T> edm_scalings_point(T sigma, T sigma_data,
                                                T sigma_min, EdmMode mode) {
  const T sd2 = mul_rn(sigma_data, sigma_data);
  const T norm = detail::edm_sqrt(add_rn(mul_rn(sigma, sigma), sd2));
  EdmScalings<T> r;
  r.c_in = T(1) / norm;
  r.t_cond = edm_t_cond(sigma);
  if (mode == EdmMode::kEdm) {
    const T d = sub_rn(sigma, sigma_min);
    r.c_skip = sd2 / add_rn(mul_rn(d, d), sd2);
    r.c_out = mul_rn(d, sigma_data) / norm;
  } else {
    r.c_skip = T(0);
    r.c_out = T(1);
  }
  return r;
}

}  // namespace epg
