// CUDA kernels of the image conversion ops.
//
// Both work on tiles of `ry` image rows by `wt` columns of one sample, staged
// as uint8 in shared memory in (row, column, channel) order:
//   normalize_images: 16-byte loads of each input row's contiguous (W, C) bytes
//     into the tile, then each (channel, row) of the planar output written with
//     16-byte stores, converting (and mirroring) on the way out;
//   to_uint8: 16-byte loads of each (channel, row) of the planar input,
//     converted to uint8 into the tile, then 16-byte stores of each interleaved
//     output row.
// Unaligned heads and tails of each row go through scalar accesses, so any
// width, channel count and storage offset works. Blocks loop over tiles; the
// grid is sized from the multiprocessor count. Light headers only (common.h).
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
#include "normalize_images.h"
#include "normalize_images_op.h"

namespace epg {

namespace {

constexpr const char* kNormalize = "epg_C::normalize_images";
constexpr const char* kToUint8 = "epg_C::to_uint8";
constexpr int64_t kTileBytes = 16384;  // shared memory per block

struct ImageTiles {
  int64_t B, H, W, C;
  int64_t ry, wt;           // rows and columns per tile
  int64_t tiles_y, tiles_x;  // tiles per sample, down and across

  __device__ int64_t count() const { return B * tiles_y * tiles_x; }
};

ImageTiles make_tiles(int64_t B, int64_t H, int64_t W, int64_t C) {
  ImageTiles t{};
  t.B = B;
  t.H = H;
  t.W = W;
  t.C = C;
  t.wt = std::min<int64_t>(W, std::max<int64_t>(1, kTileBytes / C));
  t.ry = std::min<int64_t>(H, std::max<int64_t>(1, kTileBytes / (t.wt * C)));
  t.tiles_y = (H + t.ry - 1) / t.ry;
  t.tiles_x = (W + t.wt - 1) / t.wt;
  return t;
}

template <typename A>
__device__ __forceinline__ void stage_stats(const ChannelStats<A>& stats, int64_t C, A* s_mean,
                                            A* s_std) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    s_mean[c] = stats.mean[c];
    s_std[c] = stats.std[c];
  }
}

template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    normalize_images_kernel(const uint8_t* __restrict__ in, const bool* __restrict__ flip,
                            T* __restrict__ out, ImageTiles g, ChannelStats<acc_t<T>> stats,
                            int in_lanes, int out_lanes) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char tile[];
  __shared__ A s_mean[kMaxImageChannels];
  __shared__ A s_std[kMaxImageChannels];
  stage_stats(stats, g.C, s_mean, s_std);
  const int64_t C = g.C, row_bytes = g.wt * g.C;
  const int in_lane = threadIdx.x % in_lanes, in_group = threadIdx.x / in_lanes;
  const int in_groups = blockDim.x / in_lanes;
  const int out_lane = threadIdx.x % out_lanes, out_group = threadIdx.x / out_lanes;
  const int out_groups = blockDim.x / out_lanes;
  for (int64_t id = blockIdx.x; id < g.count(); id += gridDim.x) {
    const int64_t b = id / (g.tiles_y * g.tiles_x);
    const int64_t y0 = (id / g.tiles_x) % g.tiles_y * g.ry;
    const int64_t x0 = id % g.tiles_x * g.wt;
    const int rows = static_cast<int>(g.ry < g.H - y0 ? g.ry : g.H - y0);
    const int cols = static_cast<int>(g.wt < g.W - x0 ? g.wt : g.W - x0);
    const bool mirrored = flip != nullptr && flip[b];
    // Mirrored samples read the mirror-image column range and reverse it on the way out.
    const int64_t xs0 = mirrored ? g.W - x0 - cols : x0;
    __syncthreads();  // the previous tile (and the staged stats) are done
    for (int r = in_group; r < rows; r += in_groups) {
      unsigned char* dst = tile + r * row_bytes;
      cuda::run_load(in + nhwc_offset(b, y0 + r, xs0, 0, g.H, g.W, C), cols * static_cast<int>(C),
                     in_lane, in_lanes, [&](int i, uint8_t v) { dst[i] = v; });
    }
    __syncthreads();
    for (int s = out_group; s < C * rows; s += out_groups) {
      const int c = s / rows, r = s % rows;
      const unsigned char* src = tile + r * row_bytes;
      const A m = s_mean[c], sd = s_std[c];
      cuda::run_store(out + nchw_offset(b, c, y0 + r, x0, C, g.H, g.W), cols, out_lane, out_lanes,
                      [&](int i) {
                        const int ix = mirrored ? cols - 1 - i : i;
                        return static_cast<T>(normalize_point(src[ix * C + c], m, sd));
                      });
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    to_uint8_kernel(const T* __restrict__ in, uint8_t* __restrict__ out, ImageTiles g,
                    ChannelStats<acc_t<T>> stats, int in_lanes, int out_lanes) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char tile[];
  __shared__ A s_mean[kMaxImageChannels];
  __shared__ A s_std[kMaxImageChannels];
  stage_stats(stats, g.C, s_mean, s_std);
  const int64_t C = g.C, row_bytes = g.wt * g.C;
  const int in_lane = threadIdx.x % in_lanes, in_group = threadIdx.x / in_lanes;
  const int in_groups = blockDim.x / in_lanes;
  const int out_lane = threadIdx.x % out_lanes, out_group = threadIdx.x / out_lanes;
  const int out_groups = blockDim.x / out_lanes;
  for (int64_t id = blockIdx.x; id < g.count(); id += gridDim.x) {
    const int64_t b = id / (g.tiles_y * g.tiles_x);
    const int64_t y0 = (id / g.tiles_x) % g.tiles_y * g.ry;
    const int64_t x0 = id % g.tiles_x * g.wt;
    const int rows = static_cast<int>(g.ry < g.H - y0 ? g.ry : g.H - y0);
    const int cols = static_cast<int>(g.wt < g.W - x0 ? g.wt : g.W - x0);
    __syncthreads();
    for (int s = in_group; s < C * rows; s += in_groups) {
      const int c = s / rows, r = s % rows;
      unsigned char* dst = tile + r * row_bytes + c;
      const A m = s_mean[c], sd = s_std[c];
      cuda::run_load(in + nchw_offset(b, c, y0 + r, x0, C, g.H, g.W), cols, in_lane, in_lanes,
                     [&](int i, T v) { dst[i * C] = to_uint8_point(static_cast<A>(v), m, sd); });
    }
    __syncthreads();
    for (int r = out_group; r < rows; r += out_groups) {
      const unsigned char* src = tile + r * row_bytes;
      cuda::run_store(out + nhwc_offset(b, y0 + r, x0, 0, g.H, g.W, C), cols * static_cast<int>(C),
                      out_lane, out_lanes, [&](int i) { return static_cast<uint8_t>(src[i]); });
    }
  }
}

}  // namespace

at::Tensor normalize_images_cuda(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                 at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype) {
  normalize_images_check_args(images, flip, mean, std, dtype);
  check_backend_device(images, /*cuda=*/true, kNormalize, "images");
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor in = images.contiguous();
  const int64_t B = in.size(0), H = in.size(1), W = in.size(2), C = in.size(3);
  at::Tensor out = in.new_empty({B, C, H, W}, in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor f = flip.has_value() ? flip->contiguous() : at::Tensor();
  const ImageTiles tiles = make_tiles(B, H, W, C);
  const int device = in.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const unsigned grid = cuda::grid_for(B * tiles.tiles_y * tiles.tiles_x, 1, device);
  const size_t smem = static_cast<size_t>(tiles.ry * tiles.wt * C);

  dispatch_kernel_float(dtype, kNormalize, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int in_lanes = cuda::lanes_for_run(tiles.wt * C);
    const int out_lanes = cuda::lanes_for_run(tiles.wt * static_cast<int64_t>(sizeof(T)));
    normalize_images_kernel<T><<<grid, cuda::kThreads, smem, stream>>>(
        in.const_data_ptr<uint8_t>(), f.defined() ? f.const_data_ptr<bool>() : nullptr,
        out.mutable_data_ptr<T>(), tiles, channel_stats<A>(mean, std), in_lanes, out_lanes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor to_uint8_cuda(const at::Tensor& images, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std) {
  to_uint8_check_args(images, mean, std);
  check_backend_device(images, /*cuda=*/true, kToUint8, "images");
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor in = images.contiguous();
  const int64_t B = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  at::Tensor out = in.new_empty({B, H, W, C}, in.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const ImageTiles tiles = make_tiles(B, H, W, C);
  const int device = in.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const unsigned grid = cuda::grid_for(B * tiles.tiles_y * tiles.tiles_x, 1, device);
  const size_t smem = static_cast<size_t>(tiles.ry * tiles.wt * C);

  dispatch_kernel_float(in.scalar_type(), kToUint8, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int in_lanes = cuda::lanes_for_run(tiles.wt * static_cast<int64_t>(sizeof(T)));
    const int out_lanes = cuda::lanes_for_run(tiles.wt * C);
    to_uint8_kernel<T><<<grid, cuda::kThreads, smem, stream>>>(
        in.const_data_ptr<T>(), out.mutable_data_ptr<uint8_t>(), tiles,
        channel_stats<A>(mean, std), in_lanes, out_lanes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace epg
