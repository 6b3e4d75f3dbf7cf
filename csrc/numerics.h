// Arithmetic helpers shared by the CPU and CUDA kernels (torch-free).
//
// acc_t<T>: the type the math runs in for storage type T: double for double,
// float for float, bfloat16 and float16 (loads widen, stores round once).
//
// mul_rn / add_rn: a product or sum rounded on its own. nvcc contracts a*b + c
// into one fused multiply-add by default (one rounding instead of two), the
// host compiler does not (setup.py passes -ffp-contract=off), and torch's reference runs
// each op separately. Writing the elementwise formulas with these makes the
// CUDA kernels round exactly like the CPU kernels, so the CPU tests check the
// arithmetic the GPU runs bit for bit (division and sqrt are IEEE-rounded on
// both as long as nobody builds with --use_fast_math).
#pragma once

#include <math.h>

#include "macros.h"

namespace epg {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

EPG_HD_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

EPG_HD_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

EPG_HD_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

EPG_HD_INLINE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

EPG_HD_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

EPG_HD_INLINE double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

EPG_HD_INLINE float sqrt_of(float x) { return ::sqrtf(x); }
EPG_HD_INLINE double sqrt_of(double x) { return ::sqrt(x); }
EPG_HD_INLINE float floor_of(float x) { return ::floorf(x); }
EPG_HD_INLINE double floor_of(double x) { return ::floor(x); }

}  // namespace epg
