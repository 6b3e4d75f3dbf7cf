// CPU kernel of the `noise_precondition` op.
#include <ATen/Parallel.h>

#include "common.h"
#include "edm_scalings_op.h"
#include "noise_precondition.h"
#include "noise_precondition_op.h"

namespace epg {

namespace {
constexpr const char* kOp = "epg_C::noise_precondition";
}  // namespace

NoisePreconditionOut noise_precondition_cpu(const at::Tensor& x0, const at::Tensor& eps,
                                            const at::Tensor& sigma, double sigma_data,
                                            double sigma_min, c10::string_view mode) {
  noise_precondition_check_args(x0, eps, sigma, mode);
  check_backend_device(x0, /*cuda=*/false, kOp, "x0");
  // (c_in, c_skip, c_out, t_cond), validated and computed by the edm_scalings kernel.
  const EdmScalingsOut scalings = edm_scalings_cpu(sigma, sigma_data, sigma_min, mode);
  const at::Tensor& c_in = std::get<0>(scalings);
  const at::Tensor x = x0.contiguous();
  const at::Tensor e = eps.contiguous();
  const at::Tensor s = sigma.contiguous();
  at::Tensor x_in = x.new_empty(x.sizes());
  const int64_t n = x.numel();
  if (n == 0) return std::tuple_cat(std::make_tuple(x_in), scalings);
  const int64_t M = n / x.size(0);  // elements per sample

  dispatch_kernel_float(x.scalar_type(), kOp, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    dispatch_float_double(s.scalar_type(), kOp, [&](auto sigma_tag) {
      using S = decltype(sigma_tag);
      const T* xp = x.const_data_ptr<T>();
      const T* ep = e.const_data_ptr<T>();
      const S* sp = s.const_data_ptr<S>();
      const S* cp = c_in.const_data_ptr<S>();
      T* out = x_in.mutable_data_ptr<T>();
      at::parallel_for(0, n, kCpuGrainSize, [&](int64_t begin, int64_t end) {
        int64_t b = begin / M;
        int64_t next = (b + 1) * M;  // first index of sample b + 1
        A sb = static_cast<A>(sp[b]);
        A cb = static_cast<A>(cp[b]);
        for (int64_t i = begin; i < end; ++i) {
          if (i == next) {
            ++b;
            next += M;
            sb = static_cast<A>(sp[b]);
            cb = static_cast<A>(cp[b]);
          }
          out[i] = static_cast<T>(
              noise_precondition_point(static_cast<A>(xp[i]), static_cast<A>(ep[i]), sb, cb));
        }
      });
    });
  });
  return std::tuple_cat(std::make_tuple(x_in), scalings);
}

}  // namespace epg
