// Backend-independent parts of the `edm_scalings` op.
#include "edm_scalings_op.h"

#include "common.h"

namespace epg {

namespace {
constexpr const char* kOp = "epg_C::edm_scalings";
}  // namespace

EdmMode edm_parse_mode(c10::string_view mode) {
  const bool is_x0 = mode == "x0";
  TORCH_CHECK(is_x0 || mode == "edm", kOp,
              ": expected `mode` to be \"x0\" or \"edm\", but got \"",
              std::string(mode), "\"");
  return is_x0 ? EdmMode::kX0 : EdmMode::kEdm;
}

EdmMode edm_check_args(const at::Tensor& sigma, c10::string_view mode) {
  TORCH_CHECK(sigma.defined(), kOp,
              ": expected `sigma` to be a tensor of shape (B,), but got None");
  check_dim(sigma, 1, kOp, "sigma", "(B,)");
  check_float_or_double(sigma, kOp, "sigma");
  return edm_parse_mode(mode);
}

EdmScalingsOut edm_empty_outputs(const at::Tensor& sigma) {
  // Tensor::new_empty_symint (not at::empty_like) keeps this file off the heavy
  // ATen/ops/*.h headers; it returns a contiguous tensor with sigma's dtype and
  // device, and works with the symbolic sizes of fake tensors. Four separate
  // allocations: the outputs must not alias each other.
  auto make = [&]() { return sigma.new_empty_symint(sigma.sym_sizes()); };
  at::Tensor c_in = make();
  at::Tensor c_skip = make();
  at::Tensor c_out = make();
  at::Tensor t_cond = make();
  return {c_in, c_skip, c_out, t_cond};
}

EdmScalingsOut edm_scalings_meta(const at::Tensor& sigma, double /*sigma_data*/,
                                 double /*sigma_min*/, c10::string_view mode) {
  edm_check_args(sigma, mode);
  return edm_empty_outputs(sigma);
}

}  // namespace epg
