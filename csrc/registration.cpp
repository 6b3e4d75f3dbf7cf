// Operator schemas and kernel registrations for the `epg_C` torch library.
//
// Every op is defined exactly once in the TORCH_LIBRARY block below and gets
// one line per backend in the TORCH_LIBRARY_IMPL blocks. To add an op `<op>`:
//   csrc/<op>.h          shared __host__ __device__ math (torch-free)
//   csrc/<op>_op.h       entry points: <op>_cpu, <op>_meta, <op>_cuda
//   csrc/<op>.cpp        argument checks, output allocation, Meta kernel
//   csrc/<op>_cpu.cpp    CPU kernel (at::parallel_for)
//   csrc/<op>_cuda.cu    CUDA kernel (light headers only)
// then add its schema and impls below. setup.py globs csrc/ for sources.
// Every op needs a Meta kernel (shape/dtype only) for torch.compile / opcheck.
#include <torch/library.h>

#include "edm_scalings_op.h"

TORCH_LIBRARY(epg_C, m) {
  m.def(
      "edm_scalings(Tensor sigma, float sigma_data, float sigma_min, str mode) -> "
      "(Tensor c_in, Tensor c_skip, Tensor c_out, Tensor t_cond)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(epg_C, CPU, m) {
  m.impl("edm_scalings", TORCH_FN(epg::edm_scalings_cpu));
}

// Shape/dtype-only kernels: used by FakeTensor (torch.compile, opcheck).
TORCH_LIBRARY_IMPL(epg_C, Meta, m) {
  m.impl("edm_scalings", TORCH_FN(epg::edm_scalings_meta));
}

#ifdef EPG_WITH_CUDA
TORCH_LIBRARY_IMPL(epg_C, CUDA, m) {
  m.impl("edm_scalings", TORCH_FN(epg::edm_scalings_cuda));
}
#endif
