// cp.async (sm_80+): global -> shared copies that hold no registers while in flight, with
// per-thread commit groups or mbarrier arrivals. Used by the LayerNorm+GELU backward ring and
// the INT4 tile and wgmma kernels.
#pragma once

#include <cstdint>
#include <type_traits>

namespace deepkern {

// kBytes (16, 8 or 4) global -> shared without registers (sm_80+), zero-filled when !ok (then
// `gmem` is not read). 16 bytes bypass L1 (.cg); smaller copies must go through it (.ca).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool ok) {
  static_assert(kBytes == 16 || kBytes == 8 || kBytes == 4, "16-, 8- or 4-byte copies");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 16 : 0)
                 : "memory");
  else if constexpr (kBytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 8 : 0)
                 : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 4 : 0)
                 : "memory");
#else
  using Word = std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2, uint32_t>>;
  *static_cast<Word*>(smem) = ok ? *static_cast<const Word*>(gmem) : Word{};
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// One arrival on the mbarrier at `bar` once this thread's earlier copies have landed (sm_80+).
// .noinc: the arrival is one of those the barrier was initialized to expect.
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(addr) : "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace deepkern
