// Host-side device facts, cached per device. Uses only the CUDA runtime and c10 (lighter to
// compile than ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

namespace deepkern {

// cudaDeviceGetAttribute(kAttr, device), cached per device (devices 0..63; others uncached).
template <cudaDeviceAttr kAttr>
inline int cached_attribute(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttr, device));
  if (device >= 0 && device < 64) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// Number of streaming multiprocessors of `device`.
inline int num_sms(int device) { return cached_attribute<cudaDevAttrMultiProcessorCount>(device); }

// Compute capability major version of `device`.
inline int cc_major(int device) { return cached_attribute<cudaDevAttrComputeCapabilityMajor>(device); }

}  // namespace deepkern
