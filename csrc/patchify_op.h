// Host-side API of the patch layout ops (index math in patchify.h):
//   epg_C::patchify_hwc(Tensor img, int patch_size) -> Tensor
//       img (B, C, H, W), H and W multiples of p -> tokens (B, (H/p)(W/p), p*p*C)
//   epg_C::unpatchify_hwc(Tensor tokens, int patch_size, int height) -> Tensor
//       tokens (B, N, p*p*C), height a multiple of p dividing N*p
//       -> img (B, C, height, N*p*p/height)
// Any dtype of 1, 2, 4 or 8 bytes per element; the two ops are each other's
// inverse (and each other's gradient).
#pragma once

#include <ATen/core/Tensor.h>

#include "patchify.h"

namespace epg {

// patchify.cpp: validation (shapes, patch size, element size).
void patchify_hwc_check_args(const at::Tensor& img, int64_t patch_size);
void unpatchify_hwc_check_args(const at::Tensor& tokens, int64_t patch_size, int64_t height);

at::Tensor patchify_hwc_meta(const at::Tensor& img, int64_t patch_size);
at::Tensor unpatchify_hwc_meta(const at::Tensor& tokens, int64_t patch_size, int64_t height);

// patchify_cpu.cpp
at::Tensor patchify_hwc_cpu(const at::Tensor& img, int64_t patch_size);
at::Tensor unpatchify_hwc_cpu(const at::Tensor& tokens, int64_t patch_size, int64_t height);

#ifdef EPG_WITH_CUDA
// patchify_cuda.cu
at::Tensor patchify_hwc_cuda(const at::Tensor& img, int64_t patch_size);
at::Tensor unpatchify_hwc_cuda(const at::Tensor& tokens, int64_t patch_size, int64_t height);
#endif

}  // namespace epg
