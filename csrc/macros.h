// Portable qualifiers for code shared between host C++ and CUDA device code.
//
// This header has no dependencies so that math headers including it compile
// with plain g++/clang++ (CPU kernels) and with nvcc (CUDA kernels) alike.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EPG_HOST_DEVICE __host__ __device__
#define EPG_FORCE_INLINE __forceinline__
#else
#define EPG_HOST_DEVICE
#if defined(_MSC_VER)
#define EPG_FORCE_INLINE __forceinline
#else
#define EPG_FORCE_INLINE inline __attribute__((always_inline))
#endif
#endif

// Use for every function that must be callable from both CPU and CUDA kernels.
#define EPG_HD_INLINE EPG_HOST_DEVICE EPG_FORCE_INLINE
