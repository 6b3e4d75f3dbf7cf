// CUDA kernel of the `edm_scalings` op.
//
// Only light headers here (ATen/core/Tensor.h and c10/cuda); registration and
// anything from torch/extension.h or ATen/cuda/CUDAContext.h stays in .cpp
// files, which keeps nvcc time per architecture small.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common.h"
#include "edm_scalings.h"
#include "edm_scalings_op.h"

namespace epg {

namespace {

constexpr int kThreads = 256;
// B is a batch size, so one wave is plenty; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = 4096;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    edm_scalings_kernel(const T* __restrict__ sigma, T* __restrict__ c_in,
                        T* __restrict__ c_skip, T* __restrict__ c_out,
                        T* __restrict__ t_cond, int64_t n, T sigma_data,
                        T sigma_min, EdmMode mode) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const EdmScalings<T> r = edm_scalings_point(sigma[i], sigma_data, sigma_min, mode);
    c_in[i] = r.c_in;
    c_skip[i] = r.c_skip;
    c_out[i] = r.c_out;
    t_cond[i] = r.t_cond;
  }
}

}  // namespace

EdmScalingsOut edm_scalings_cuda(const at::Tensor& sigma, double sigma_data,
                                 double sigma_min, c10::string_view mode) {
  const EdmMode m = edm_check_args(sigma, mode);
  TORCH_CHECK(sigma.device().is_cuda(),
              "epg_C::edm_scalings (CUDA kernel): expected `sigma` on a CUDA device, but got ",
              sigma.device());
  const c10::cuda::CUDAGuard guard(sigma.device());
  const at::Tensor s = sigma.contiguous();
  EdmScalingsOut out = edm_empty_outputs(s);
  const int64_t n = s.numel();
  if (n == 0) return out;  // a 0-block launch would be an error

  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sigma.device().index()).stream();

  dispatch_float_double(s.scalar_type(), "epg_C::edm_scalings", [&](auto tag) {
    using scalar_t = decltype(tag);
    edm_scalings_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), std::get<0>(out).mutable_data_ptr<scalar_t>(),
        std::get<1>(out).mutable_data_ptr<scalar_t>(),
        std::get<2>(out).mutable_data_ptr<scalar_t>(),
        std::get<3>(out).mutable_data_ptr<scalar_t>(), n, static_cast<scalar_t>(sigma_data),
        static_cast<scalar_t>(sigma_min), m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace epg
