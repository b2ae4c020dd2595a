// Host-side device facts, cached per device. Uses only the CUDA runtime and c10 (lighter to
// compile than ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

namespace deepkern {

// Number of streaming multiprocessors of `device` (cached; devices 0..63).
inline int num_sms(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// Compute capability major version of `device` (cached; devices 0..63).
inline int cc_major(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (device >= 0 && device < 64) cache[device].store(major, std::memory_order_relaxed);
  return major;
}

}  // namespace deepkern
