// Reductions across the CTAs of a thread-block cluster (sm_90) through distributed shared
// memory, in a fixed rank order so every CTA gets the same bits.
#pragma once

#include <cooperative_groups.h>

namespace deepkern {

// One value per CTA, combined over the cluster's CTAs in rank order with `combine`.
// `xchg` is a __shared__ V[2] (double-buffered by `parity`, so one cluster barrier per call
// suffices: a CTA cannot reuse a slot before every CTA has passed the next call's barrier),
// `bcast` a __shared__ V. Every thread of every CTA in the cluster must call this.
template <int CLUSTER, typename V, typename Combine>
__device__ __forceinline__ V cluster_allreduce(V local, V* xchg, V* bcast, int& parity,
                                               Combine combine) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) xchg[parity] = local;
  cluster.sync();
  __syncthreads();  // bcast of the previous call has been read by every thread
  if (threadIdx.x == 0) {
    V total = *cluster.map_shared_rank(&xchg[parity], 0);
#pragma unroll
    for (int r = 1; r < CLUSTER; ++r) total = combine(total, *cluster.map_shared_rank(&xchg[parity], r));
    *bcast = total;
  }
  __syncthreads();
  parity ^= 1;
  return *bcast;
#else
  __trap();  // clusters need sm_90; the host never launches this on older GPUs
  return local;
#endif
}

}  // namespace deepkern
