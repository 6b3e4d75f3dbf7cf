// CUDA kernel of the `noise_precondition` op.
//
// Grid: y walks the samples, x splits a sample's M elements over blocks; each
// thread handles 16-byte vectors of x0/eps/x_in (scalar head and tail where a
// sample does not start or end on a vector boundary). The per-sample scalings
// come from the edm_scalings CUDA kernel launched first on the same stream.
// Light headers only (see common.h).
//
// Only a GPU can confirm: that the kernels give the CPU kernels' values on the
// device (bit for bit where the header says so; the cuda-marked tests of
// tests/test_extension_ops.py check it), and their bandwidth. Without a GPU the
// indexing, tiling, barriers and 16-byte alignment were checked by running this
// source under a CPU thread emulator against the CPU kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"
#include "cuda_utils.cuh"
#include "edm_scalings_op.h"
#include "noise_precondition.h"
#include "noise_precondition_op.h"

namespace epg {

namespace {

constexpr const char* kOp = "epg_C::noise_precondition";

template <typename T, typename S>
__global__ void __launch_bounds__(cuda::kThreads)
    noise_precondition_kernel(const T* __restrict__ x0, const T* __restrict__ eps,
                              const S* __restrict__ sigma, const S* __restrict__ c_in,
                              T* __restrict__ x_in, int64_t B, int64_t M, bool vec_ok) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lanes = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const A s = static_cast<A>(sigma[b]);
    const A c = static_cast<A>(c_in[b]);
    auto scalar = [&](int64_t i) {
      x_in[i] = static_cast<T>(
          noise_precondition_point(static_cast<A>(x0[i]), static_cast<A>(eps[i]), s, c));
    };
    auto vector = [&](int64_t i) {
      const cuda::VecN<T, V> xv = cuda::load_vec<V>(x0 + i);
      const cuda::VecN<T, V> ev = cuda::load_vec<V>(eps + i);
      cuda::VecN<T, V> out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        out.v[k] = static_cast<T>(noise_precondition_point(static_cast<A>(xv.v[k]),
                                                           static_cast<A>(ev.v[k]), s, c));
      }
      cuda::store_vec<V>(x_in + i, out);
    };
    cuda::for_each_in_run<V>(b * M, M, vec_ok, lane, lanes, scalar, vector);
  }
}

}  // namespace

NoisePreconditionOut noise_precondition_cuda(const at::Tensor& x0, const at::Tensor& eps,
                                             const at::Tensor& sigma, double sigma_data,
                                             double sigma_min, c10::string_view mode) {
  noise_precondition_check_args(x0, eps, sigma, mode);
  check_backend_device(x0, /*cuda=*/true, kOp, "x0");
  const c10::cuda::CUDAGuard guard(x0.device());
  // (c_in, c_skip, c_out, t_cond), validated and computed by the edm_scalings kernel.
  const EdmScalingsOut scalings = edm_scalings_cuda(sigma, sigma_data, sigma_min, mode);
  const at::Tensor& c_in = std::get<0>(scalings);
  const at::Tensor x = x0.contiguous();
  const at::Tensor e = eps.contiguous();
  const at::Tensor s = sigma.contiguous();
  at::Tensor x_in = x.new_empty(x.sizes());
  const int64_t n = x.numel();
  if (n == 0) return std::tuple_cat(std::make_tuple(x_in), scalings);
  const int64_t B = x.size(0);
  const int64_t M = n / B;
  const int device = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool vec_ok = cuda::aligned16(x.const_data_ptr()) && cuda::aligned16(e.const_data_ptr()) &&
                      cuda::aligned16(x_in.const_data_ptr());

  dispatch_kernel_float(x.scalar_type(), kOp, [&](auto tag) {
    using T = decltype(tag);
    dispatch_float_double(s.scalar_type(), kOp, [&](auto sigma_tag) {
      using S = decltype(sigma_tag);
      const dim3 grid = cuda::per_sample_grid(B, M, 16 / sizeof(T), device);
      noise_precondition_kernel<T, S><<<grid, cuda::kThreads, 0, stream>>>(
          x.const_data_ptr<T>(), e.const_data_ptr<T>(), s.const_data_ptr<S>(),
          c_in.const_data_ptr<S>(), x_in.mutable_data_ptr<T>(), B, M, vec_ok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return std::tuple_cat(std::make_tuple(x_in), scalings);
}

}  // namespace epg
