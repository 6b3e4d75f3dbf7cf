// Shared index math of the patch layout ops (torch-free; CPU and CUDA kernels).
//
// An image (B, C, H, W) with H, W multiples of the patch size p becomes tokens
// (B, N, D), N = (H/p) * (W/p) patches in row-major order, D = p * p * C
// features in (p1, p2, c) order: the layout the EPG output head produces
// (`... (p1 p2 c)` in einops notation; Conv2d weights use (c, p1, p2) instead).
// Pixel (b, c, y, x) is token n = (y / p) * (W / p) + x / p, feature
// k = ((y % p) * p + x % p) * C + c. For a fixed image row y and patch column
// j, the p pixels x = j*p .. j*p + p - 1 of all C channels are p * C contiguous
// token elements starting at token_offset(g, b, 0, y, j * p).
#pragma once

#include <stdint.h>

#include "macros.h"

namespace epg {

struct PatchGeometry {
  int64_t B, C, H, W, p;

  EPG_HD_INLINE int64_t grid_w() const { return W / p; }
  EPG_HD_INLINE int64_t tokens() const { return (H / p) * (W / p); }
  EPG_HD_INLINE int64_t features() const { return p * p * C; }
};

// Offset of pixel (b, c, y, x) in the contiguous image (B, C, H, W).
EPG_HD_INLINE int64_t image_offset(const PatchGeometry& g, int64_t b, int64_t c, int64_t y,
                                   int64_t x) {
  return ((b * g.C + c) * g.H + y) * g.W + x;
}

// Offset of the same pixel in the contiguous tokens (B, N, p * p * C).
EPG_HD_INLINE int64_t token_offset(const PatchGeometry& g, int64_t b, int64_t c, int64_t y,
                                   int64_t x) {
  const int64_t n = (y / g.p) * g.grid_w() + x / g.p;
  const int64_t k = ((y % g.p) * g.p + x % g.p) * g.C + c;
  return (b * g.tokens() + n) * g.features() + k;
}

}  // namespace epg
