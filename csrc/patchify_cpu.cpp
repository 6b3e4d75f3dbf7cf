// CPU kernels of the patch layout ops: at::parallel_for over image rows (b, y);
// elements move as raw words of their size.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "patchify.h"
#include "patchify_op.h"

namespace epg {

namespace {
constexpr const char* kPatchify = "epg_C::patchify_hwc";
constexpr const char* kUnpatchify = "epg_C::unpatchify_hwc";

// Copies between image (B, C, H, W) and tokens (B, N, p*p*C) in either direction.
template <typename Word, bool kToTokens>
void patch_copy(const PatchGeometry& g, const Word* src, Word* dst) {
  const int64_t row_elements = g.C * g.W;
  const int64_t grain = std::max<int64_t>(1, kCpuGrainSize / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, g.B * g.H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.H, y = row % g.H;
      for (int64_t x0 = 0; x0 < g.W; x0 += g.p) {
        const int64_t tok = token_offset(g, b, 0, y, x0);  // p * C contiguous (p2, c)
        for (int64_t c = 0; c < g.C; ++c) {
          const int64_t img = image_offset(g, b, c, y, x0);  // p contiguous pixels
          for (int64_t p2 = 0; p2 < g.p; ++p2) {
            if (kToTokens) {
              dst[tok + p2 * g.C + c] = src[img + p2];
            } else {
              dst[img + p2] = src[tok + p2 * g.C + c];
            }
          }
        }
      }
    }
  });
}
}  // namespace

at::Tensor patchify_hwc_cpu(const at::Tensor& img, int64_t patch_size) {
  patchify_hwc_check_args(img, patch_size);
  check_backend_device(img, /*cuda=*/false, kPatchify, "img");
  const at::Tensor in = img.contiguous();
  const PatchGeometry g{in.size(0), in.size(1), in.size(2), in.size(3), patch_size};
  at::Tensor out = in.new_empty({g.B, g.tokens(), g.features()});
  if (out.numel() == 0) return out;
  dispatch_element_size(in.element_size(), kPatchify, [&](auto tag) {
    using Word = decltype(tag);
    patch_copy<Word, true>(g, static_cast<const Word*>(in.const_data_ptr()),
                        static_cast<Word*>(out.mutable_data_ptr()));
  });
  return out;
}

at::Tensor unpatchify_hwc_cpu(const at::Tensor& tokens, int64_t patch_size, int64_t height) {
  unpatchify_hwc_check_args(tokens, patch_size, height);
  check_backend_device(tokens, /*cuda=*/false, kUnpatchify, "tokens");
  const at::Tensor in = tokens.contiguous();
  const int64_t channels = in.size(2) / (patch_size * patch_size);
  const int64_t width = in.size(1) / (height / patch_size) * patch_size;
  const PatchGeometry g{in.size(0), channels, height, width, patch_size};
  at::Tensor out = in.new_empty({g.B, g.C, g.H, g.W});
  if (out.numel() == 0) return out;
  dispatch_element_size(in.element_size(), kUnpatchify, [&](auto tag) {
    using Word = decltype(tag);
    patch_copy<Word, false>(g, static_cast<const Word*>(in.const_data_ptr()),
                         static_cast<Word*>(out.mutable_data_ptr()));
  });
  return out;
}

}  // namespace epg
