// Backend-independent parts of the per-sample loss ops.
#include "losses_op.h"

#include <cmath>

#include "common.h"

namespace epg {

namespace {

bool target_dtype_ok(at::ScalarType pred, at::ScalarType target) {
  return target == pred ||
         (target == at::kFloat && (pred == at::kBFloat16 || pred == at::kHalf));
}

// A (B,) per-sample tensor of a kernel float dtype on pred's device.
void check_per_sample(const at::Tensor& t, const at::Tensor& pred, const char* op,
                      const char* arg) {
  check_dim(t, 1, op, arg, "(B,)");
  TORCH_CHECK(t.sym_size(0) == pred.sym_size(0), op, ": expected `", arg,
              "` of shape (B,) = (", pred.sym_size(0), ",) for `pred` of shape ",
              pred.sym_sizes(), ", but got ", t.sym_sizes());
  check_kernel_float(t, op, arg);
  check_same_device(t, pred.device(), op, arg, "pred");
}

void check_common(LossKind kind, bool backward, const at::Tensor& pred,
                  const at::Tensor& target, const at::Tensor& weight, double c) {
  const char* op = loss_op_name(kind, backward);
  TORCH_CHECK(pred.dim() >= 1, op,
              ": expected `pred` to be a tensor of shape (B, ...), but got a 0-D tensor");
  check_kernel_float(pred, op, "pred");
  TORCH_CHECK(same_shape(target, pred), op, ": expected `target` to have the shape of `pred` ",
              pred.sym_sizes(), ", but got ", target.sym_sizes());
  TORCH_CHECK(target_dtype_ok(pred.scalar_type(), target.scalar_type()), op,
              ": expected `target` to have the dtype of `pred` (", dtype_name(pred.scalar_type()),
              ") or torch.float32 for a torch.bfloat16/torch.float16 `pred`, but got ",
              dtype_name(target.scalar_type()));
  check_same_device(target, pred.device(), op, "target", "pred");
  check_per_sample(weight, pred, op, "weight");
  if (kind == LossKind::kPseudoHuber) {
    TORCH_CHECK(std::isfinite(c) && c > 0, op, ": expected `c` to be a finite number > 0, but got ",
                c);
  }
}

}  // namespace

void loss_check_args(LossKind kind, const at::Tensor& pred, const at::Tensor& target,
                     const at::Tensor& weight, double c) {
  check_common(kind, /*backward=*/false, pred, target, weight, c);
}

void loss_backward_check_args(LossKind kind, const at::Tensor& grad, const at::Tensor& pred,
                              const at::Tensor& target, const at::Tensor& weight,
                              const at::Tensor& sqsum, double c) {
  check_common(kind, /*backward=*/true, pred, target, weight, c);
  const char* op = loss_op_name(kind, /*backward=*/true);
  check_per_sample(grad, pred, op, "grad");
  if (kind == LossKind::kPseudoHuber) check_per_sample(sqsum, pred, op, "sqsum");
}

at::ScalarType loss_compute_dtype(const at::Tensor& pred) {
  return pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

LossOut loss_empty_outputs(const at::Tensor& pred) {
  const auto options = pred.options().dtype(loss_compute_dtype(pred));
  const c10::SymInt B = pred.sym_size(0);
  at::Tensor loss = pred.new_empty_symint({B}, options);
  at::Tensor stat = pred.new_empty_symint({B}, options);
  return {loss, stat};
}

LossOut weighted_mse_loss_meta(const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight) {
  loss_check_args(LossKind::kWeightedMse, pred, target, weight, 0.0);
  return loss_empty_outputs(pred);
}

at::Tensor weighted_mse_loss_backward_meta(const at::Tensor& grad, const at::Tensor& pred,
                                           const at::Tensor& target, const at::Tensor& weight) {
  loss_backward_check_args(LossKind::kWeightedMse, grad, pred, target, weight, at::Tensor(), 0.0);
  return pred.new_empty_symint(pred.sym_sizes());
}

LossOut pseudo_huber_loss_meta(const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight, double c) {
  loss_check_args(LossKind::kPseudoHuber, pred, target, weight, c);
  return loss_empty_outputs(pred);
}

at::Tensor pseudo_huber_loss_backward_meta(const at::Tensor& grad, const at::Tensor& pred,
                                           const at::Tensor& target, const at::Tensor& weight,
                                           const at::Tensor& sqsum, double c) {
  loss_backward_check_args(LossKind::kPseudoHuber, grad, pred, target, weight, sqsum, c);
  return pred.new_empty_symint(pred.sym_sizes());
}

}  // namespace epg
