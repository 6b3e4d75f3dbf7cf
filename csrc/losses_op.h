// Host-side API of the per-sample loss ops (math in losses.h):
//   epg_C::weighted_mse_loss(Tensor pred, Tensor target, Tensor weight)
//       -> (Tensor loss, Tensor mse)
//   epg_C::weighted_mse_loss_backward(Tensor grad, Tensor pred, Tensor target,
//                                     Tensor weight) -> Tensor
//   epg_C::pseudo_huber_loss(Tensor pred, Tensor target, Tensor weight, float c)
//       -> (Tensor loss, Tensor sqsum)
//   epg_C::pseudo_huber_loss_backward(Tensor grad, Tensor pred, Tensor target,
//                                     Tensor weight, Tensor sqsum, float c) -> Tensor
// pred (B, ...) float32/64, bfloat16 or float16; target of pred's shape and
// dtype, or float32 for a bfloat16/float16 pred; weight, grad, sqsum (B,).
// The (B,) outputs are float32 (float64 for a float64 pred); the backward
// returns d loss / d pred in pred's dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "common.h"
#include "losses.h"

namespace epg {

using LossOut = std::tuple<at::Tensor, at::Tensor>;

// ---- shared helpers (losses.cpp) ---------------------------------------------

// "epg_C::<op>" for error messages.
inline const char* loss_op_name(LossKind kind, bool backward) {
  if (kind == LossKind::kWeightedMse) {
    return backward ? "epg_C::weighted_mse_loss_backward" : "epg_C::weighted_mse_loss";
  }
  return backward ? "epg_C::pseudo_huber_loss_backward" : "epg_C::pseudo_huber_loss";
}

// Validates the forward's arguments (shapes, dtypes, devices, c > 0).
void loss_check_args(LossKind kind, const at::Tensor& pred, const at::Tensor& target,
                     const at::Tensor& weight, double c);

// Also validates grad (and sqsum for the pseudo-Huber loss).
void loss_backward_check_args(LossKind kind, const at::Tensor& grad, const at::Tensor& pred,
                              const at::Tensor& target, const at::Tensor& weight,
                              const at::Tensor& sqsum, double c);

// float64 for a float64 pred, float32 otherwise.
at::ScalarType loss_compute_dtype(const at::Tensor& pred);

// Two new (B,) tensors of the compute dtype on pred's device.
LossOut loss_empty_outputs(const at::Tensor& pred);

// ---- entry points ----------------------------------------------------------------

LossOut weighted_mse_loss_meta(const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight);
at::Tensor weighted_mse_loss_backward_meta(const at::Tensor& grad, const at::Tensor& pred,
                                           const at::Tensor& target, const at::Tensor& weight);
LossOut pseudo_huber_loss_meta(const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight, double c);
at::Tensor pseudo_huber_loss_backward_meta(const at::Tensor& grad, const at::Tensor& pred,
                                           const at::Tensor& target, const at::Tensor& weight,
                                           const at::Tensor& sqsum, double c);

// losses_cpu.cpp
LossOut loss_forward_cpu(LossKind kind, const at::Tensor& pred, const at::Tensor& target,
                         const at::Tensor& weight, double c);
at::Tensor loss_backward_cpu(LossKind kind, const at::Tensor& grad, const at::Tensor& pred,
                             const at::Tensor& target, const at::Tensor& weight,
                             const at::Tensor& sqsum, double c);

LossOut weighted_mse_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& weight);
at::Tensor weighted_mse_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                          const at::Tensor& target, const at::Tensor& weight);
LossOut pseudo_huber_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& weight, double c);
at::Tensor pseudo_huber_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                          const at::Tensor& target, const at::Tensor& weight,
                                          const at::Tensor& sqsum, double c);

#ifdef EPG_WITH_CUDA
// losses_cuda.cu
LossOut loss_forward_cuda(LossKind kind, const at::Tensor& pred, const at::Tensor& target,
                          const at::Tensor& weight, double c);
at::Tensor loss_backward_cuda(LossKind kind, const at::Tensor& grad, const at::Tensor& pred,
                              const at::Tensor& target, const at::Tensor& weight,
                              const at::Tensor& sqsum, double c);

LossOut weighted_mse_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight);
at::Tensor weighted_mse_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred,
                                           const at::Tensor& target, const at::Tensor& weight);
LossOut pseudo_huber_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight, double c);
at::Tensor pseudo_huber_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred,
                                           const at::Tensor& target, const at::Tensor& weight,
                                           const at::Tensor& sqsum, double c);
#endif

// Calls f(pred_tag, target_tag) for the supported (pred, target) dtype pairs:
// equal dtypes, or a bfloat16/float16 pred with a float32 target.
template <typename F>
inline void dispatch_loss_dtypes(at::ScalarType pred, at::ScalarType target, const char* op,
                                 F&& f) {
  dispatch_kernel_float(pred, op, [&](auto pred_tag) {
    using P = decltype(pred_tag);
    if (target == pred) {
      f(pred_tag, pred_tag);
      return;
    }
    if constexpr (sizeof(P) == 2) {
      if (target == at::kFloat) {
        f(pred_tag, float{});
        return;
      }
    }
    TORCH_CHECK(false, op, ": expected `target` to have the dtype of `pred` (", dtype_name(pred),
                ") or torch.float32 for a torch.bfloat16/torch.float16 `pred`, but got ",
                dtype_name(target));
  });
}

}  // namespace epg
