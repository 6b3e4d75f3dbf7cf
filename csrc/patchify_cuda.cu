// CUDA kernels of the patch layout ops.
//
// Both are transposes of (pixel, channel) pairs between the planar image rows
// (B, C, H, W) and the interleaved (p2, c) runs of the tokens (B, N, p*p*C).
// A block handles a tile of `ry` image rows by `jt` patch columns of one sample
// at a time, staged in shared memory: 16-byte loads of the source's contiguous
// runs into the tile, then 16-byte stores of the destination's runs read from
// it (scalar accesses for unaligned heads and tails). Elements move as raw
// words of their size, so any 1/2/4/8-byte dtype works. Blocks loop over tiles;
// the grid is sized from the multiprocessor count. Light headers only (common.h).
//
// Only a GPU can confirm: that the kernels give the CPU kernels' values on the
// device (bit for bit where the header says so; the cuda-marked tests of
// tests/test_extension_ops.py check it), and their bandwidth. Without a GPU the
// indexing, tiling, barriers and 16-byte alignment were checked by running this
// source under a CPU thread emulator against the CPU kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common.h"
#include "cuda_utils.cuh"
#include "patchify.h"
#include "patchify_op.h"

namespace epg {

namespace {

constexpr const char* kPatchify = "epg_C::patchify_hwc";
constexpr const char* kUnpatchify = "epg_C::unpatchify_hwc";
constexpr int64_t kTileBytes = 16384;  // shared memory per block
constexpr int64_t kMaxTileBytes = 48 * 1024;

struct PatchTiles {
  PatchGeometry g;
  int64_t ry, jt;            // image rows and patch columns per tile
  int64_t tiles_y, tiles_x;  // tiles per sample, down and across

  __device__ int64_t count() const { return g.B * tiles_y * tiles_x; }
};

PatchTiles make_tiles(const PatchGeometry& g, int64_t element_size, const char* op) {
  const int64_t column_bytes = g.C * g.p * element_size;  // one patch column of one row
  TORCH_CHECK(column_bytes <= kMaxTileBytes, op,
              " (CUDA kernel): expected patch_size * channels * element_size <= ", kMaxTileBytes,
              " bytes, but got ", g.p, " * ", g.C, " * ", element_size);
  PatchTiles t{};
  t.g = g;
  t.jt = std::min<int64_t>(g.grid_w(), std::max<int64_t>(1, kTileBytes / column_bytes));
  t.ry = std::min<int64_t>(g.H, std::max<int64_t>(1, kTileBytes / (column_bytes * t.jt)));
  t.tiles_y = (g.H + t.ry - 1) / t.ry;
  t.tiles_x = (g.grid_w() + t.jt - 1) / t.jt;
  return t;
}

// kToTokens: image -> tokens (patchify_hwc), else tokens -> image (unpatchify_hwc).
// Shared tile layout: image order [c][r][jt*p] when reading an image, token order
// [r][jt][p*C] when reading tokens.
template <typename Word, bool kToTokens>
__global__ void __launch_bounds__(cuda::kThreads)
    patch_copy_kernel(const Word* __restrict__ src, Word* __restrict__ dst, PatchTiles t,
                      int in_lanes, int out_lanes) {
  extern __shared__ __align__(16) unsigned char raw[];
  Word* tile = reinterpret_cast<Word*>(raw);
  const PatchGeometry& g = t.g;
  const int p = static_cast<int>(g.p), C = static_cast<int>(g.C);
  const int run = p * C;                              // token run of one row, one patch column
  const int L = static_cast<int>(t.jt) * p;           // image run of one tile row
  const int ry = static_cast<int>(t.ry), jt = static_cast<int>(t.jt);
  const int in_lane = threadIdx.x % in_lanes, in_group = threadIdx.x / in_lanes;
  const int in_groups = blockDim.x / in_lanes;
  const int out_lane = threadIdx.x % out_lanes, out_group = threadIdx.x / out_lanes;
  const int out_groups = blockDim.x / out_lanes;
  for (int64_t id = blockIdx.x; id < t.count(); id += gridDim.x) {
    const int64_t b = id / (t.tiles_y * t.tiles_x);
    const int64_t y0 = (id / t.tiles_x) % t.tiles_y * t.ry;
    const int64_t j0 = id % t.tiles_x * t.jt;
    const int rows = static_cast<int>(t.ry < g.H - y0 ? t.ry : g.H - y0);
    const int cols = static_cast<int>(t.jt < g.grid_w() - j0 ? t.jt : g.grid_w() - j0);
    __syncthreads();  // the previous tile is written out
    if (kToTokens) {
      for (int s = in_group; s < C * rows; s += in_groups) {  // image runs (c, r)
        const int c = s / rows, r = s % rows;
        Word* row = tile + (c * ry + r) * L;
        cuda::run_load(src + image_offset(g, b, c, y0 + r, j0 * p), cols * p, in_lane, in_lanes,
                       [&](int i, Word v) { row[i] = v; });
      }
      __syncthreads();
      for (int s = out_group; s < rows * cols; s += out_groups) {  // token runs (r, j)
        const int r = s / cols, j = s % cols;
        cuda::run_store(dst + token_offset(g, b, 0, y0 + r, (j0 + j) * p), run, out_lane, out_lanes,
                        [&](int k) { return tile[((k % C) * ry + r) * L + j * p + k / C]; });
      }
    } else {
      for (int s = in_group; s < rows * cols; s += in_groups) {  // token runs (r, j)
        const int r = s / cols, j = s % cols;
        Word* seg = tile + (r * jt + j) * run;
        cuda::run_load(src + token_offset(g, b, 0, y0 + r, (j0 + j) * p), run, in_lane, in_lanes,
                       [&](int k, Word v) { seg[k] = v; });
      }
      __syncthreads();
      for (int s = out_group; s < C * rows; s += out_groups) {  // image runs (c, r)
        const int c = s / rows, r = s % rows;
        const Word* seg = tile + r * jt * run;
        cuda::run_store(dst + image_offset(g, b, c, y0 + r, j0 * p), cols * p, out_lane, out_lanes,
                        [&](int i) { return seg[(i / p) * run + (i % p) * C + c]; });
      }
    }
  }
}

template <bool kToTokens>
void launch_patch_copy(const at::Tensor& in, at::Tensor& out, const PatchGeometry& g,
                       const char* op) {
  const int64_t element_size = in.element_size();
  const PatchTiles tiles = make_tiles(g, element_size, op);
  const int device = in.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const unsigned grid = cuda::grid_for(g.B * tiles.tiles_y * tiles.tiles_x, 1, device);
  const size_t smem = static_cast<size_t>(g.C * tiles.ry * tiles.jt * g.p * element_size);
  const int image_lanes = cuda::lanes_for_run(tiles.jt * g.p * element_size);
  const int token_lanes = cuda::lanes_for_run(g.p * g.C * element_size);
  const int in_lanes = kToTokens ? image_lanes : token_lanes;
  const int out_lanes = kToTokens ? token_lanes : image_lanes;
  dispatch_element_size(element_size, op, [&](auto tag) {
    using Word = decltype(tag);
    patch_copy_kernel<Word, kToTokens><<<grid, cuda::kThreads, smem, stream>>>(
        static_cast<const Word*>(in.const_data_ptr()), static_cast<Word*>(out.mutable_data_ptr()),
        tiles, in_lanes, out_lanes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor patchify_hwc_cuda(const at::Tensor& img, int64_t patch_size) {
  patchify_hwc_check_args(img, patch_size);
  check_backend_device(img, /*cuda=*/true, kPatchify, "img");
  const c10::cuda::CUDAGuard guard(img.device());
  const at::Tensor in = img.contiguous();
  const PatchGeometry g{in.size(0), in.size(1), in.size(2), in.size(3), patch_size};
  at::Tensor out = in.new_empty({g.B, g.tokens(), g.features()});
  if (out.numel() == 0) return out;
  launch_patch_copy<true>(in, out, g, kPatchify);
  return out;
}

at::Tensor unpatchify_hwc_cuda(const at::Tensor& tokens, int64_t patch_size, int64_t height) {
  unpatchify_hwc_check_args(tokens, patch_size, height);
  check_backend_device(tokens, /*cuda=*/true, kUnpatchify, "tokens");
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor in = tokens.contiguous();
  const int64_t channels = in.size(2) / (patch_size * patch_size);
  const int64_t width = in.size(1) / (height / patch_size) * patch_size;
  const PatchGeometry g{in.size(0), channels, height, width, patch_size};
  at::Tensor out = in.new_empty({g.B, g.C, g.H, g.W});
  if (out.numel() == 0) return out;
  launch_patch_copy<false>(in, out, g, kUnpatchify);
  return out;
}

}  // namespace epg
