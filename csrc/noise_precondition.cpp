// Backend-independent parts of the `noise_precondition` op.
#include "noise_precondition_op.h"

#include "common.h"
#include "edm_scalings_op.h"

#include <string>

namespace epg {

namespace {
constexpr const char* kOp = "epg_C::noise_precondition";
}  // namespace

EdmMode noise_precondition_check_args(const at::Tensor& x0, const at::Tensor& eps,
                                      const at::Tensor& sigma, c10::string_view mode) {
  TORCH_CHECK(x0.dim() >= 1, kOp, ": expected `x0` to be a tensor of shape (B, ...), but got a ",
              "0-D tensor");
  check_kernel_float(x0, kOp, "x0");
  TORCH_CHECK(same_shape(eps, x0), kOp,
              ": expected `eps` to have the shape of `x0` ", x0.sym_sizes(), ", but got ",
              eps.sym_sizes());
  TORCH_CHECK(eps.scalar_type() == x0.scalar_type(), kOp, ": expected `eps` to have the dtype of `x0` (",
              dtype_name(x0.scalar_type()), "), but got ", dtype_name(eps.scalar_type()));
  check_dim(sigma, 1, kOp, "sigma", "(B,)");
  check_float_or_double(sigma, kOp, "sigma");
  TORCH_CHECK(sigma.sym_size(0) == x0.sym_size(0), kOp, ": expected `sigma` of shape (B,) = (",
              x0.sym_size(0), ",) for `x0` of shape ", x0.sym_sizes(), ", but got ",
              sigma.sym_sizes());
  check_same_device(eps, x0.device(), kOp, "eps", "x0");
  check_same_device(sigma, x0.device(), kOp, "sigma", "x0");
  const bool is_x0 = mode == "x0";
  TORCH_CHECK(is_x0 || mode == "edm", kOp, ": expected `mode` to be \"x0\" or \"edm\", but got \"",
              std::string(mode), "\"");
  return is_x0 ? EdmMode::kX0 : EdmMode::kEdm;
}

NoisePreconditionOut noise_precondition_meta(const at::Tensor& x0, const at::Tensor& eps,
                                             const at::Tensor& sigma, double /*sigma_data*/,
                                             double /*sigma_min*/, c10::string_view mode) {
  noise_precondition_check_args(x0, eps, sigma, mode);
  return std::tuple_cat(std::make_tuple(x0.new_empty_symint(x0.sym_sizes())),
                        edm_empty_outputs(sigma));
}

}  // namespace epg
