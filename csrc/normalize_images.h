// Shared math of the image conversion ops (torch-free; CPU and CUDA kernels):
//   normalize_images: uint8 (B, H, W, C) -> (B, C, H, W),
//                     x = (u / 255 - mean[c]) / std[c], optionally mirrored
//                     left-right per sample;
//   to_uint8:         (B, C, H, W) -> uint8 (B, H, W, C), the inverse for saving:
//                     x01 = x * std[c] + mean[c], clamped to [0, 1] (NaN -> 0),
//                     u = floor(x01 * 255 + 0.5) (round half up, as PNG writers of
//                     the official code and epg.data.embedded.to_uint8 do).
// Arithmetic in A = float32 (float64 for float64 images), each step rounded on
// its own like the reference's torch ops (numerics.h), so the CUDA kernel gives
// the CPU kernel's values bit for bit.
#pragma once

#include <stdint.h>

#include "macros.h"
#include "numerics.h"

namespace epg {

// Most channels the kernels take (mean/std travel as kernel arguments).
constexpr int kMaxImageChannels = 16;

template <typename A>
struct ChannelStats {
  A mean[kMaxImageChannels];
  A std[kMaxImageChannels];
};

template <typename A>
EPG_HD_INLINE A normalize_point(uint8_t u, A mean, A std) {
  return sub_rn(static_cast<A>(u) / A(255), mean) / std;
}

template <typename A>
EPG_HD_INLINE uint8_t to_uint8_point(A x, A mean, A std) {
  A x01 = add_rn(mul_rn(x, std), mean);
  if (!(x01 >= A(0))) x01 = A(0);  // also maps NaN to 0
  if (x01 > A(1)) x01 = A(1);
  return static_cast<uint8_t>(floor_of(add_rn(mul_rn(x01, A(255)), A(0.5))));
}

// Offsets in contiguous (B, H, W, C) and (B, C, H, W) tensors.
EPG_HD_INLINE int64_t nhwc_offset(int64_t b, int64_t y, int64_t x, int64_t c, int64_t H,
                                  int64_t W, int64_t C) {
  return ((b * H + y) * W + x) * C + c;
}

EPG_HD_INLINE int64_t nchw_offset(int64_t b, int64_t c, int64_t y, int64_t x, int64_t C,
                                  int64_t H, int64_t W) {
  return ((b * C + c) * H + y) * W + x;
}

}  // namespace epg
