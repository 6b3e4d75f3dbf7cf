// Backend-independent parts of the patch layout ops.
#include "patchify_op.h"

#include "common.h"

namespace epg {

namespace {
constexpr const char* kPatchify = "epg_C::patchify_hwc";
constexpr const char* kUnpatchify = "epg_C::unpatchify_hwc";

void check_element_size(const at::Tensor& t, const char* op, const char* arg) {
  const int64_t size = t.element_size();
  TORCH_CHECK(size == 1 || size == 2 || size == 4 || size == 8, op, ": expected `", arg,
              "` to have a dtype of 1, 2, 4 or 8 bytes per element, but got ",
              dtype_name(t.scalar_type()));
}
}  // namespace

void patchify_hwc_check_args(const at::Tensor& img, int64_t patch_size) {
  TORCH_CHECK(patch_size >= 1, kPatchify, ": expected `patch_size` >= 1, but got ", patch_size);
  check_dim(img, 4, kPatchify, "img", "(B, C, H, W)");
  check_element_size(img, kPatchify, "img");
  TORCH_CHECK(img.sym_size(2) % patch_size == 0 && img.sym_size(3) % patch_size == 0, kPatchify,
              ": expected `img` of shape (B, C, H, W) with H and W multiples of patch_size = ",
              patch_size, ", but got ", img.sym_sizes());
}

void unpatchify_hwc_check_args(const at::Tensor& tokens, int64_t patch_size, int64_t height) {
  TORCH_CHECK(patch_size >= 1, kUnpatchify, ": expected `patch_size` >= 1, but got ", patch_size);
  check_dim(tokens, 3, kUnpatchify, "tokens", "(B, N, p*p*C)");
  check_element_size(tokens, kUnpatchify, "tokens");
  const int64_t pp = patch_size * patch_size;
  const c10::SymInt D = tokens.sym_size(2);
  TORCH_CHECK(D >= pp && D % pp == 0, kUnpatchify,
              ": expected `tokens` of shape (B, N, p*p*C) with p*p = ", pp,
              " dividing the last dim, but got ", tokens.sym_sizes());
  TORCH_CHECK(height >= patch_size && height % patch_size == 0 &&
                  tokens.sym_size(1) % (height / patch_size) == 0,
              kUnpatchify, ": expected `height` to be a multiple of patch_size = ", patch_size,
              " with height / patch_size dividing the token count N = ", tokens.sym_size(1),
              ", but got height = ", height);
}

at::Tensor patchify_hwc_meta(const at::Tensor& img, int64_t patch_size) {
  patchify_hwc_check_args(img, patch_size);
  const auto s = img.sym_sizes();
  return img.new_empty_symint(
      {s[0], (s[2] / patch_size) * (s[3] / patch_size), s[1] * patch_size * patch_size});
}

at::Tensor unpatchify_hwc_meta(const at::Tensor& tokens, int64_t patch_size, int64_t height) {
  unpatchify_hwc_check_args(tokens, patch_size, height);
  const auto s = tokens.sym_sizes();
  const c10::SymInt channels = s[2] / (patch_size * patch_size);
  const c10::SymInt width = s[1] / (height / patch_size) * patch_size;
  return tokens.new_empty_symint({s[0], channels, c10::SymInt(height), width});
}

}  // namespace epg
