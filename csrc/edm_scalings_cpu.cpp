// CPU kernel of the `edm_scalings` op.
#include <ATen/Parallel.h>

#include "common.h"
#include "edm_scalings.h"
#include "edm_scalings_op.h"

namespace epg {

EdmScalingsOut edm_scalings_cpu(const at::Tensor& sigma, double sigma_data,
                                double sigma_min, c10::string_view mode) {
  const EdmMode m = edm_check_args(sigma, mode);
  TORCH_CHECK(sigma.device().is_cpu(),
              "epg_C::edm_scalings (CPU kernel): expected `sigma` on the CPU, but got ",
              sigma.device());
  const at::Tensor s = sigma.contiguous();
  EdmScalingsOut out = edm_empty_outputs(s);
  const int64_t n = s.numel();
  if (n == 0) return out;

  dispatch_float_double(s.scalar_type(), "epg_C::edm_scalings", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* in = s.const_data_ptr<scalar_t>();
    scalar_t* c_in = std::get<0>(out).mutable_data_ptr<scalar_t>();
    scalar_t* c_skip = std::get<1>(out).mutable_data_ptr<scalar_t>();
    scalar_t* c_out = std::get<2>(out).mutable_data_ptr<scalar_t>();
    scalar_t* t_cond = std::get<3>(out).mutable_data_ptr<scalar_t>();
    const auto sd = static_cast<scalar_t>(sigma_data);
    const auto smin = static_cast<scalar_t>(sigma_min);
    at::parallel_for(0, n, kCpuGrainSize, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const EdmScalings<scalar_t> r = edm_scalings_point(in[i], sd, smin, m);
        c_in[i] = r.c_in;
        c_skip[i] = r.c_skip;
        c_out[i] = r.c_out;
        t_cond[i] = r.t_cond;
      }
    });
  });
  return out;
}

}  // namespace epg
