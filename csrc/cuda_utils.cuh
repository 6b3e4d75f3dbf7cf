// Launch and memory-access helpers shared by the CUDA kernels (.cu files only).
//
// Light on purpose: cuda_runtime.h and c10/cuda/CUDAException.h only (no
// ATen/cuda/CUDAContext.h, no torch/extension.h), see common.h.
//
// Access pattern used throughout: 16-byte vector loads/stores (VecN) on the
// aligned middle of each contiguous run, scalar accesses for the unaligned
// head and the tail, so any size and any storage offset is handled.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace epg {
namespace cuda {

constexpr int kThreads = 256;    // threads per block for every kernel here
constexpr int kBlocksPerSm = 4;  // grid size = this many blocks per multiprocessor
constexpr int kMaxGridY = 65535;

// Number of multiprocessors of `device`, asked once per device and cached.
inline int multiprocessor_count(int device) {
  static std::atomic<int> cache[64];  // static storage: zero-initialised
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int n = cache[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// Blocks for a grid-stride loop over `work` items of `per_block` items each:
// enough to fill the device (kBlocksPerSm per multiprocessor), never more than needed.
inline unsigned grid_for(int64_t work, int64_t per_block, int device) {
  const int64_t target = static_cast<int64_t>(multiprocessor_count(device)) * kBlocksPerSm;
  const int64_t need = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(need, target)));
}

// Grid for per-sample kernels over B samples of M elements: y walks the
// samples (blocks loop when B > 65535), x splits one sample; x * y is about
// the device-filling target, x never more than the sample needs.
inline dim3 per_sample_grid(int64_t B, int64_t M, int64_t per_thread, int device) {
  const int64_t target = static_cast<int64_t>(multiprocessor_count(device)) * kBlocksPerSm;
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>(B, kMaxGridY));
  const int64_t need_x = (M + kThreads * per_thread - 1) / (kThreads * per_thread);
  const int64_t want_x = (target + gy - 1) / gy;
  const int64_t gx = std::max<int64_t>(1, std::min(need_x, want_x));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Smallest power of two >= the 16-byte vectors of a run of `bytes`, capped at a warp:
// how many lanes cooperate on one contiguous run in the tiled kernels.
inline int lanes_for_run(int64_t bytes) {
  const int64_t vectors = (bytes + 15) / 16;
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return lanes;
}

// N consecutive elements moved as one (N * sizeof(T))-byte access.
template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ VecN<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const VecN<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const VecN<T, N>& v) {
  *reinterpret_cast<VecN<T, N>*>(p) = v;
}

// Visits the flat indices [start, start + n) of arrays whose base pointers are
// 16-byte aligned: scalar(i) up to the next multiple of V, vector(i) for each
// run of V elements starting at an aligned i, scalar(i) for the tail. Lane
// `lane` of `lanes` cooperating threads takes every lanes-th item. Without
// vec_ok (a base pointer is not aligned) every index goes through scalar(i).
template <int V, typename Scalar, typename Vector>
__device__ __forceinline__ void for_each_in_run(int64_t start, int64_t n, bool vec_ok,
                                                int64_t lane, int64_t lanes, Scalar scalar,
                                                Vector vector) {
  if (!vec_ok) {
    for (int64_t i = lane; i < n; i += lanes) scalar(start + i);
    return;
  }
  const int64_t to_boundary = (V - start % V) % V;
  const int64_t head = to_boundary < n ? to_boundary : n;
  for (int64_t i = lane; i < head; i += lanes) scalar(start + i);
  const int64_t nv = (n - head) / V;
  for (int64_t v = lane; v < nv; v += lanes) vector(start + head + v * V);
  for (int64_t i = head + nv * V + lane; i < n; i += lanes) scalar(start + i);
}

// Reads the n contiguous elements at src: put(i, src[i]) for every i, the
// 16-byte-aligned middle with vector loads. Lanes as in for_each_in_run.
template <typename T, typename Put>
__device__ __forceinline__ void run_load(const T* src, int n, int lane, int lanes, Put put) {
  constexpr int V = 16 / sizeof(T);
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(src) & 15);
  const int to_boundary = static_cast<int>(((16 - misalign) & 15) / sizeof(T));
  const int head = to_boundary < n ? to_boundary : n;
  for (int i = lane; i < head; i += lanes) put(i, src[i]);
  const int nv = (n - head) / V;
  for (int v = lane; v < nv; v += lanes) {
    const int i0 = head + v * V;
    const VecN<T, V> x = load_vec<V>(src + i0);
#pragma unroll
    for (int k = 0; k < V; ++k) put(i0 + k, x.v[k]);
  }
  for (int i = head + nv * V + lane; i < n; i += lanes) put(i, src[i]);
}

// Writes the n contiguous elements at dst: dst[i] = get(i), the aligned middle
// with 16-byte vector stores.
template <typename T, typename Get>
__device__ __forceinline__ void run_store(T* dst, int n, int lane, int lanes, Get get) {
  constexpr int V = 16 / sizeof(T);
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(dst) & 15);
  const int to_boundary = static_cast<int>(((16 - misalign) & 15) / sizeof(T));
  const int head = to_boundary < n ? to_boundary : n;
  for (int i = lane; i < head; i += lanes) dst[i] = get(i);
  const int nv = (n - head) / V;
  for (int v = lane; v < nv; v += lanes) {
    const int i0 = head + v * V;
    VecN<T, V> x;
#pragma unroll
    for (int k = 0; k < V; ++k) x.v[k] = get(i0 + k);
    store_vec<V>(dst + i0, x);
  }
  for (int i = head + nv * V + lane; i < n; i += lanes) dst[i] = get(i);
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); the
// result is valid in thread 0. `scratch` holds >= 32 values in shared memory
// and may be reused after the call.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : A(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace epg
