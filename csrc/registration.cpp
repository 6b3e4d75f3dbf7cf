// Operator schemas and kernel registrations for the `epg_C` torch library.
//
// Every op is defined exactly once in the TORCH_LIBRARY block below and has one
// line in EPG_IMPL_ALL, which binds it for every backend. To add an op `<op>`:
//   csrc/<op>.h          shared __host__ __device__ math (torch-free)
//   csrc/<op>_op.h       entry points: <op>_cpu, <op>_meta, <op>_cuda
//   csrc/<op>.cpp        argument checks, output allocation, Meta kernel
//   csrc/<op>_cpu.cpp    CPU kernel (at::parallel_for)
//   csrc/<op>_cuda.cu    CUDA kernel (light headers only)
// then add its schema below and its line to EPG_IMPL_ALL. setup.py globs csrc/
// for sources. Shared helpers: common.h (checks, dtype dispatch), numerics.h
// (compute types, unfused rounding), cuda_utils.cuh (grid sizing, 16-byte
// vector access, block reductions; .cu files only).
// Every op needs a Meta kernel (shape/dtype only) for torch.compile / opcheck.
#include <torch/library.h>

#include "edm_scalings_op.h"
#include "losses_op.h"
#include "noise_precondition_op.h"
#include "normalize_images_op.h"
#include "patchify_op.h"

TORCH_LIBRARY(epg_C, m) {
  m.def(
      "edm_scalings(Tensor sigma, float sigma_data, float sigma_min, str mode) -> "
      "(Tensor c_in, Tensor c_skip, Tensor c_out, Tensor t_cond)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "noise_precondition(Tensor x0, Tensor eps, Tensor sigma, float sigma_data, "
      "float sigma_min, str mode) -> "
      "(Tensor x_in, Tensor c_in, Tensor c_skip, Tensor c_out, Tensor t_cond)",
      {at::Tag::pt2_compliant_tag});
  m.def("weighted_mse_loss(Tensor pred, Tensor target, Tensor weight) -> (Tensor loss, Tensor mse)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "weighted_mse_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor weight) -> "
      "Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "pseudo_huber_loss(Tensor pred, Tensor target, Tensor weight, float c) -> "
      "(Tensor loss, Tensor sqsum)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "pseudo_huber_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor weight, "
      "Tensor sqsum, float c) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "normalize_images(Tensor images, Tensor? flip, float[] mean, float[] std, "
      "ScalarType dtype) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("to_uint8(Tensor images, float[] mean, float[] std) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("patchify_hwc(Tensor img, int patch_size) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("unpatchify_hwc(Tensor tokens, int patch_size, int height) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// One line per op and backend; `X` is the backend suffix of the entry points.
#define EPG_IMPL_ALL(m, X)                                                        \
  m.impl("edm_scalings", TORCH_FN(epg::edm_scalings_##X));                        \
  m.impl("noise_precondition", TORCH_FN(epg::noise_precondition_##X));            \
  m.impl("weighted_mse_loss", TORCH_FN(epg::weighted_mse_loss_##X));              \
  m.impl("weighted_mse_loss_backward", TORCH_FN(epg::weighted_mse_loss_backward_##X)); \
  m.impl("pseudo_huber_loss", TORCH_FN(epg::pseudo_huber_loss_##X));              \
  m.impl("pseudo_huber_loss_backward", TORCH_FN(epg::pseudo_huber_loss_backward_##X)); \
  m.impl("normalize_images", TORCH_FN(epg::normalize_images_##X));                \
  m.impl("to_uint8", TORCH_FN(epg::to_uint8_##X));                                \
  m.impl("patchify_hwc", TORCH_FN(epg::patchify_hwc_##X));                        \
  m.impl("unpatchify_hwc", TORCH_FN(epg::unpatchify_hwc_##X))

TORCH_LIBRARY_IMPL(epg_C, CPU, m) { EPG_IMPL_ALL(m, cpu); }

// Shape/dtype-only kernels: used by FakeTensor (torch.compile, opcheck).
TORCH_LIBRARY_IMPL(epg_C, Meta, m) { EPG_IMPL_ALL(m, meta); }

#ifdef EPG_WITH_CUDA
TORCH_LIBRARY_IMPL(epg_C, CUDA, m) { EPG_IMPL_ALL(m, cuda); }
#endif
