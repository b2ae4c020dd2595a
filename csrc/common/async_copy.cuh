// cp.async (sm_80+): global -> shared copies that hold no registers while in flight, with
// per-thread commit groups. Used by the LayerNorm+GELU backward ring and the INT4 tile kernel.
#pragma once

#include <cstdint>
#include <type_traits>

namespace deepkern {

// kBytes (16 or 4) global -> shared without registers (sm_80+), zero-filled when !ok (then
// `gmem` is not read). 16 bytes bypass L1 (.cg); smaller copies must go through it (.ca).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool ok) {
  static_assert(kBytes == 16 || kBytes == 4, "16- or 4-byte copies");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 16 : 0)
                 : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 4 : 0)
                 : "memory");
#else
  using Word = std::conditional_t<kBytes == 16, uint4, uint32_t>;
  *static_cast<Word*>(smem) = ok ? *static_cast<const Word*>(gmem) : Word{};
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
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
