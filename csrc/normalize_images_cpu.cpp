// CPU kernels of the image conversion ops: at::parallel_for over image rows (b, y).
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "normalize_images.h"
#include "normalize_images_op.h"

namespace epg {

namespace {
constexpr const char* kNormalize = "epg_C::normalize_images";
constexpr const char* kToUint8 = "epg_C::to_uint8";

int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kCpuGrainSize / std::max<int64_t>(1, row_elements));
}
}  // namespace

at::Tensor normalize_images_cpu(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                at::ScalarType dtype) {
  normalize_images_check_args(images, flip, mean, std, dtype);
  check_backend_device(images, /*cuda=*/false, kNormalize, "images");
  const at::Tensor in = images.contiguous();
  const int64_t B = in.size(0), H = in.size(1), W = in.size(2), C = in.size(3);
  at::Tensor out = in.new_empty({B, C, H, W}, in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor f = flip.has_value() ? flip->contiguous() : at::Tensor();
  const bool* fp = f.defined() ? f.const_data_ptr<bool>() : nullptr;
  const uint8_t* src = in.const_data_ptr<uint8_t>();

  dispatch_kernel_float(dtype, kNormalize, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const ChannelStats<A> stats = channel_stats<A>(mean, std);
    T* dst = out.mutable_data_ptr<T>();
    at::parallel_for(0, B * H, row_grain(W * C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        const bool mirrored = fp != nullptr && fp[b];
        for (int64_t c = 0; c < C; ++c) {
          T* out_row = dst + nchw_offset(b, c, y, 0, C, H, W);
          for (int64_t x = 0; x < W; ++x) {
            const int64_t xs = mirrored ? W - 1 - x : x;
            out_row[x] = static_cast<T>(
                normalize_point(src[nhwc_offset(b, y, xs, c, H, W, C)], stats.mean[c], stats.std[c]));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor to_uint8_cpu(const at::Tensor& images, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std) {
  to_uint8_check_args(images, mean, std);
  check_backend_device(images, /*cuda=*/false, kToUint8, "images");
  const at::Tensor in = images.contiguous();
  const int64_t B = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  at::Tensor out = in.new_empty({B, H, W, C}, in.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();

  dispatch_kernel_float(in.scalar_type(), kToUint8, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const ChannelStats<A> stats = channel_stats<A>(mean, std);
    const T* src = in.const_data_ptr<T>();
    at::parallel_for(0, B * H, row_grain(W * C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        for (int64_t c = 0; c < C; ++c) {
          const T* in_row = src + nchw_offset(b, c, y, 0, C, H, W);
          for (int64_t x = 0; x < W; ++x) {
            dst[nhwc_offset(b, y, x, c, H, W, C)] =
                to_uint8_point(static_cast<A>(in_row[x]), stats.mean[c], stats.std[c]);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace epg
