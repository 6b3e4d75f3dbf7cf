// Host-side API of the image conversion ops (math in normalize_images.h):
//   epg_C::normalize_images(Tensor images, Tensor? flip, float[] mean, float[] std,
//                           ScalarType dtype) -> Tensor
//       images uint8 (B, H, W, C), 1 <= C <= 16; flip None or bool (B,); mean, std
//       C values each; dtype float32/64, bfloat16 or float16 -> (B, C, H, W) of dtype.
//   epg_C::to_uint8(Tensor images, float[] mean, float[] std) -> Tensor
//       images (B, C, H, W) float32/64, bfloat16 or float16 -> uint8 (B, H, W, C).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include "normalize_images.h"

namespace epg {

// ---- shared helpers (normalize_images.cpp) --------------------------------------

void normalize_images_check_args(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                 at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype);
void to_uint8_check_args(const at::Tensor& images, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std);

// mean/std as the compute type A (float or double).
template <typename A>
ChannelStats<A> channel_stats(at::ArrayRef<double> mean, at::ArrayRef<double> std) {
  ChannelStats<A> s{};
  for (size_t c = 0; c < mean.size(); ++c) {
    s.mean[c] = static_cast<A>(mean[c]);
    s.std[c] = static_cast<A>(std[c]);
  }
  return s;
}

// ---- entry points -------------------------------------------------------------------

at::Tensor normalize_images_meta(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                 at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype);
at::Tensor to_uint8_meta(const at::Tensor& images, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std);

// normalize_images_cpu.cpp
at::Tensor normalize_images_cpu(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                at::ScalarType dtype);
at::Tensor to_uint8_cpu(const at::Tensor& images, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std);

#ifdef EPG_WITH_CUDA
// normalize_images_cuda.cu
at::Tensor normalize_images_cuda(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                 at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype);
at::Tensor to_uint8_cuda(const at::Tensor& images, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std);
#endif

}  // namespace epg
