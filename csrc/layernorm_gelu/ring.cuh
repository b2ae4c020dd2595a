// Pieces of the copy-ring kernel (bwd_ring_kernel, backward.cuh): per-thread
// cp.async copies into shared memory, and row sums over warps, CTAs and thread clusters.
//
// Ring: each thread copies its own 16-byte vectors of the rows kRingStages - 1 steps ahead
// into its own shared-memory slots (cp.async, sm_80+), one commit group per step, and reads
// them back after cp.async.wait_group. A thread only reads what it copied, so no barrier
// guards the slots, and no registers are held by loads in flight: memory keeps streaming
// while the CTA waits in its row reductions.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

#include "common/async_copy.cuh"
#include "common/vec.cuh"

namespace deepkern::lngelu {

constexpr int kRingStages = 3;
constexpr int kMaxClusterRing = 16;  // H100: 16 with the non-portable cluster size attribute

__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();  // the host launches clusters only on sm_90+
#endif
}

// Sum of (a, b) over a warp in 5 shuffles instead of 10: the first step swaps halves, so
// lanes 0-15 go on summing a and lanes 16-31 b. Lanes 0-15 return the total of a, lanes 16-31
// that of b (the same bits in every lane of a half: each step adds the same two values).
__device__ __forceinline__ float warp_sum_pair(float a, float b) {
  const bool low = (threadIdx.x & 16) == 0;
  float v = low ? a : b;
  v += __shfl_xor_sync(0xffffffffu, low ? b : a, 16);
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Row totals of (c1, c2) in every thread of the row: a warp, then the CTA's warps of the row
// (partials in `red` by row parity, so one barrier per row: a buffer is written again only
// two rows later, after every thread has passed the next row's barrier), then the cluster's
// CTAs (each pushes its total into every CTA's `cl`, by parity; one cluster barrier; all add
// the totals in rank order, so every CTA gets the same bits).
__device__ __forceinline__ float2 ring_row_sum(float c1, float c2, int warps, int ctas, int rank,
                                               int parity, float2 (*red)[32],
                                               float2 (*cl)[kMaxClusterRing]) {
  float v = warp_sum_pair(c1, c2);
  if (warps > 1) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, first = warp - warp % warps;
    if (lane == 0) red[parity][warp].x = v;
    if (lane == 16) red[parity][warp].y = v;
    __syncthreads();
    const float2 mine = lane < warps ? red[parity][first + lane] : make_float2(0.f, 0.f);
    v = warp_sum_pair(mine.x, mine.y);
  }
  float2 total = make_float2(__shfl_sync(0xffffffffu, v, 0), __shfl_sync(0xffffffffu, v, 16));
  if (ctas > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x < ctas) *cluster.map_shared_rank(&cl[parity][rank], threadIdx.x) = total;
    cluster_barrier();
    total = make_float2(0.f, 0.f);
    for (int r = 0; r < ctas; ++r) total.x += cl[parity][r].x, total.y += cl[parity][r].y;
#else
    __trap();
#endif
  }
  return total;
}

}  // namespace deepkern::lngelu
