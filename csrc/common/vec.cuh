// Small device helpers shared by the kernels: 16-byte vector loads/stores with conversion to
// fp32, and warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace deepkern {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements of T as one aligned access (16 bytes for the fast paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads N elements starting at p (aligned to sizeof(T) * N) and widens them to fp32.
template <typename T, int N>
__device__ __forceinline__ void load_float(const T* __restrict__ p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

// One pack of N elements, loaded evict-first (streaming data read exactly once).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> ldcs_pack(const T* __restrict__ p) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<const Pack<T, N>*>(&raw);
  } else {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  }
}

// Narrows N fp32 values to T and stores them as one access.
template <typename T, int N>
__device__ __forceinline__ void store_float(T* __restrict__ p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Loads N weights that are either T-typed or fp32 (runtime flag, uniform across the grid).
template <typename T, int N>
__device__ __forceinline__ void load_param(const void* __restrict__ p, bool fp32, int64_t col,
                                           float (&out)[N]) {
  if (fp32) {
    const float* f = static_cast<const float*>(p) + col;
    if constexpr (N % 4 == 0) {
#pragma unroll
      for (int i = 0; i < N; i += 4) {
        const float4 q = *reinterpret_cast<const float4*>(f + i);
        out[i] = q.x, out[i + 1] = q.y, out[i + 2] = q.z, out[i + 3] = q.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = f[i];
    }
  } else {
    load_float<T, N>(static_cast<const T*>(p) + col, out);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the `warps` consecutive warps that share one row (warps <= 32). `scratch` holds
// 32 floats per row group; every thread of the group gets the result. `group` is the row
// group's index inside the block; its threads must be warps [group*warps, (group+1)*warps).
__device__ __forceinline__ float group_sum(float v, int warps, float* scratch) {
  v = warp_sum(v);
  if (warps == 1) return v;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int first = warp - warp % warps;
  __syncthreads();  // scratch may still be read by the previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  // Lane i reads warp i's partial, then one more warp sum: every thread gets the same bits.
  // (A loop of `warps` shared loads per thread cost ~7 SASS instructions per element of
  // layernorm_gelu's split forward, bf16 8192-wide rows.)
  return warp_sum(lane < warps ? scratch[first + lane] : 0.f);
}

// Two sums at once (one pair of barriers instead of two). scratch: __shared__ float[2][32].
// Each warp sums the group's per-warp partials with shuffles (lane i reads one), rather than
// every thread reading all of them: 2 shared loads per thread instead of 2 * `warps`.
__device__ __forceinline__ float2 group_sum2(float2 v, int warps, float (*scratch)[32]) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if (warps == 1) return v;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int first = warp - warp % warps;
  __syncthreads();
  if (lane == 0) scratch[0][warp] = v.x, scratch[1][warp] = v.y;
  __syncthreads();
  const bool mine = lane < warps;
  return make_float2(warp_sum(mine ? scratch[0][first + lane] : 0.f),
                     warp_sum(mine ? scratch[1][first + lane] : 0.f));
}

}  // namespace deepkern
