// Shared math of the per-sample losses (torch-free; CPU and CUDA kernels).
//
// Both losses compare a prediction p with a target t, sample by sample, through
// S_b = sum over the sample's M elements of (p - t)^2 (each square rounded in
// the compute type A = acc_t of the prediction dtype, then accumulated in
// float64 by both the CPU and the CUDA kernel, and S_b rounded to A once):
//
//   weighted_mse_loss:  loss_b = w_b * mse_b,             mse_b = S_b / M
//       d loss_b / d p  = w_b * 2 (p - t) / M
//   pseudo_huber_loss:  loss_b = w_b * S_b / sqrt(S_b + c^2)   (EPG consistency loss)
//       d loss_b / d p  = w_b * 2 (p - t) / sqrt(S_b + c^2)
//     i.e. the normaliser sqrt(S_b + c^2) is under stop-gradient, as in the
//     official code: the gradient is twice that of w_b * (sqrt(S_b + c^2) - c).
//
// The forward returns (loss_b, stat_b) with stat_b = mse_b or S_b, so that the
// weight gradient (stat_b, or S_b / sqrt(S_b + c^2)) needs no second pass. A
// backward multiplies grad_b by the per-sample factor k_b below and then
// computes k_b * (p - t) per element.
#pragma once

#include <stdint.h>

#include "macros.h"
#include "numerics.h"

namespace epg {

enum class LossKind : int {
  kWeightedMse = 0,
  kPseudoHuber = 1,
};

template <typename A>
struct LossValue {
  A loss;  // w_b * (mse_b or S_b / sqrt(S_b + c^2))
  A stat;  // mse_b (weighted MSE) or S_b (pseudo-Huber)
};

template <typename A>
EPG_HD_INLINE A squared_difference(A p, A t) {
  const A d = sub_rn(p, t);
  return mul_rn(d, d);
}

// Per-sample loss from the sum of squares S_b. `c2` = c^2 (pseudo-Huber only).
template <typename A>
EPG_HD_INLINE LossValue<A> loss_finish(LossKind kind, A sqsum, int64_t M, A weight, A c2) {
  LossValue<A> r;
  if (kind == LossKind::kWeightedMse) {
    r.stat = sqsum / static_cast<A>(M);
    r.loss = mul_rn(weight, r.stat);
  } else {
    r.stat = sqsum;
    r.loss = mul_rn(weight, sqsum) / sqrt_of(add_rn(sqsum, c2));
  }
  return r;
}

// k_b with d loss / d p = k_b * (p - t) for an upstream gradient `grad` of loss_b.
// `sqsum` is S_b of the forward (pseudo-Huber only).
template <typename A>
EPG_HD_INLINE A loss_grad_factor(LossKind kind, A grad, A weight, int64_t M, A sqsum, A c2) {
  const A scaled = mul_rn(mul_rn(grad, weight), A(2));
  if (kind == LossKind::kWeightedMse) return scaled / static_cast<A>(M);
  return scaled / sqrt_of(add_rn(sqsum, c2));
}

template <typename A>
EPG_HD_INLINE A loss_grad_point(A factor, A p, A t) {
  return mul_rn(factor, sub_rn(p, t));
}

}  // namespace epg
