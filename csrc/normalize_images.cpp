// Backend-independent parts of the image conversion ops.
#include "normalize_images_op.h"

#include <cmath>

#include "common.h"

namespace epg {

namespace {

constexpr const char* kNormalize = "epg_C::normalize_images";
constexpr const char* kToUint8 = "epg_C::to_uint8";

void check_stats(const char* op, int64_t channels, at::ArrayRef<double> mean,
                 at::ArrayRef<double> std) {
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels &&
                  static_cast<int64_t>(std.size()) == channels,
              op, ": expected `mean` and `std` to hold one value per channel (C = ", channels,
              "), but got ", mean.size(), " and ", std.size(), " values");
  for (size_t c = 0; c < std.size(); ++c) {
    TORCH_CHECK(std::isfinite(mean[c]) && std::isfinite(std[c]) && std[c] != 0.0, op,
                ": expected finite `mean` and finite non-zero `std`, but channel ", c, " has mean ",
                mean[c], " and std ", std[c]);
  }
}

}  // namespace

void normalize_images_check_args(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                 at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype) {
  check_dim(images, 4, kNormalize, "images", "(B, H, W, C)");
  TORCH_CHECK(images.scalar_type() == at::kByte, kNormalize,
              ": expected `images` to have dtype torch.uint8, but got ",
              dtype_name(images.scalar_type()));
  const c10::SymInt C = images.sym_size(3);
  TORCH_CHECK(C >= 1 && C <= kMaxImageChannels, kNormalize,
              ": expected `images` of shape (B, H, W, C) with 1 <= C <= ", kMaxImageChannels,
              ", but got ", images.sym_sizes());
  TORCH_CHECK(is_kernel_float(dtype), kNormalize,
              ": expected `dtype` torch.float32, torch.float64, torch.bfloat16 or torch.float16, "
              "but got ", dtype_name(dtype));
  if (flip.has_value()) {
    const at::Tensor& f = *flip;
    check_dim(f, 1, kNormalize, "flip", "(B,)");
    TORCH_CHECK(f.scalar_type() == at::kBool, kNormalize,
                ": expected `flip` to have dtype torch.bool, but got ", dtype_name(f.scalar_type()));
    TORCH_CHECK(f.sym_size(0) == images.sym_size(0), kNormalize,
                ": expected `flip` of shape (B,) = (", images.sym_size(0), ",), but got ",
                f.sym_sizes());
    check_same_device(f, images.device(), kNormalize, "flip", "images");
  }
  check_stats(kNormalize, C.guard_int(__FILE__, __LINE__), mean, std);
}

void to_uint8_check_args(const at::Tensor& images, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std) {
  check_dim(images, 4, kToUint8, "images", "(B, C, H, W)");
  check_kernel_float(images, kToUint8, "images");
  const c10::SymInt C = images.sym_size(1);
  TORCH_CHECK(C >= 1 && C <= kMaxImageChannels, kToUint8,
              ": expected `images` of shape (B, C, H, W) with 1 <= C <= ", kMaxImageChannels,
              ", but got ", images.sym_sizes());
  check_stats(kToUint8, C.guard_int(__FILE__, __LINE__), mean, std);
}

at::Tensor normalize_images_meta(const at::Tensor& images, const std::optional<at::Tensor>& flip,
                                 at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                 at::ScalarType dtype) {
  normalize_images_check_args(images, flip, mean, std, dtype);
  const auto s = images.sym_sizes();
  return images.new_empty_symint({s[0], s[3], s[1], s[2]}, images.options().dtype(dtype));
}

at::Tensor to_uint8_meta(const at::Tensor& images, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std) {
  to_uint8_check_args(images, mean, std);
  const auto s = images.sym_sizes();
  return images.new_empty_symint({s[0], s[2], s[3], s[1]}, images.options().dtype(at::kByte));
}

}  // namespace epg
