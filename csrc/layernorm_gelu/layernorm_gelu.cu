// Fused LayerNorm/RMSNorm + GELU: launch configuration and op entry points. The kernels and
// the design notes are in kernels.cuh.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "common/device.h"
#include "layernorm_gelu/backward.cuh"

namespace deepkern {
namespace {

using lngelu::BwdParams;
using lngelu::FwdParams;

// ---------------------------------------------------------------------------------------
// Launch configuration.
//
// A row of nvec vectors (16 bytes each, or single elements on the scalar path) is spread over
// `tpr` threads holding `iters` vectors each. Few vectors per thread keep registers low, so
// many warps stay resident (H100, 16384x8192 bf16: 1 vector/thread at 1024 threads per row
// beats 2 vectors at 512).

struct RowsConfig {
  int iters = 0;  // 0: rows too long for the register kernels
  int tpr = 0;  // threads per row
};

// Threads per row at most, by vectors per thread (the kernels' launch bounds).
constexpr int max_tpr(int iters, bool backward) {
  return backward ? 1024 / iters : (iters >= 8 ? 256 : 1024);
}

// H100 sweep (bf16, forward): 4 vectors per thread at 256 threads per row beat 1 vector at
// 1024 (16384x8192: 294 us vs 629 us; 32768x5120: 373 vs 571): fewer threads per row means
// cheaper row reductions and more rows in flight per SM. So, forward: the most vectors per
// thread (up to 4) that still leave >= 128 threads per row, fewer when the row is short (one
// warp per row below 128 vectors). Backward: the fewest vectors per thread that fit.
RowsConfig rows_config(int nvec, bool backward) {
  int force = 0;  // tuning sweeps: DEEPKERN_LNG_{FWD,BWD}_ITERS
  if (const char* env = std::getenv(backward ? "DEEPKERN_LNG_BWD_ITERS" : "DEEPKERN_LNG_FWD_ITERS"))
    force = std::atoi(env);
  auto make = [&](int iters) {
    const int tpr = ((nvec + iters - 1) / iters + 31) / 32 * 32;
    return tpr <= max_tpr(iters, backward) ? RowsConfig{iters, tpr} : RowsConfig{};
  };
  if (force == 1 || force == 2 || force == 4 || force == 8) {
    const RowsConfig cfg = make(force);
    if (cfg.iters != 0) return cfg;
  }
  if (nvec <= 32) return {1, 32};
  if (backward) {
    // H100 bf16, backward: 1 vector per thread (up to 1024 threads per row) beats 2
    // (16384x8192: 504 vs 570 us; 32768x5120: 743 vs 946; 65536x1024: 256 vs 258).
    for (int iters = 1; iters <= 4; iters *= 2) {
      const RowsConfig cfg = make(iters);
      if (cfg.iters != 0) return cfg;
    }
    return {};
  }
  if (nvec <= 64) return {2, 32};
  if (nvec <= 128) return {4, 32};
  const int max_iters = 4;
  for (int iters = max_iters; iters >= 1; iters /= 2)
    if ((nvec + iters - 1) / iters >= 128 || iters == 1) {
      const RowsConfig cfg = make(iters);
      if (cfg.iters != 0) return cfg;
    }
  for (int iters = max_iters * 2; iters <= 8; iters *= 2) {
    const RowsConfig cfg = make(iters);
    if (cfg.iters != 0) return cfg;
  }
  return {};
}

template <typename T>
bool vector_ok(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides, int n) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec != 0) return false;
  for (const void* ptr : ptrs)
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides)
    if (s % kVec != 0) return false;
  return true;
}

// At least 128 threads per CTA, and a whole number of rows: with tpr = 96 a 128-thread CTA
// would hand its last warp a second, partial row (wrong sums, a write race on the next row).
int threads_for(const RowsConfig& cfg) { return cfg.tpr * std::max(1, 128 / cfg.tpr); }

// ---------------------------------------------------------------------------------------
// Backward copy-ring kernel (bwd_ring_kernel; ring.cuh): 2 16-byte vectors per thread (1 for
// rows of < 64 vectors), short rows several to a CTA, rows of more than 1024 vectors over a
// thread cluster (sm_90a builds on sm_90 GPUs) of CTAs whose thread count divides 512 (the
// 128-register CTAs then fill the register file: 8192x12288 bf16 2 x 384 threads 339 us, 3 x
// 256 310); persistent (as many walkers as fit at once). H100 bf16, against 1 vector per
// thread: 16384x8192 296 vs 367 us, 32768x5120 420 vs 486, 65536x1024 164 vs 200.
// (The same ring for the forward ran slower than fwd_rows/fwd_split at every bench shape,
// e.g. 16384x8192 256 vs 213 us: one 16-warp CTA per SM with two dependent row reductions is
// latency-bound where the forward has little arithmetic per row to hide them.)
// Tuning: DEEPKERN_LNG_BWD_RING=0 turns it off, ..._ITERS=1|2, ..._CLUSTER=N splits rows over
// at least N CTAs; DEEPKERN_LNG_DEBUG=1 prints each new launch geometry.

struct Ring {
  int iters = 0;  // 0: the ring kernels do not apply
  int ctas = 1;  // CTAs per row (a thread cluster when > 1)
  int tpr = 0;  // threads per row and CTA
  int rows_per_cta = 1;
  int threads = 0;
};

Ring ring_geometry(int nvec, int64_t rows, int device) {
  if (const char* off = std::getenv("DEEPKERN_LNG_BWD_RING"); off && std::atoi(off) == 0) return {};
  Ring g;
  g.iters = nvec >= 64 ? 2 : 1;
  if (const char* v = std::getenv("DEEPKERN_LNG_BWD_RING_ITERS")) g.iters = std::atoi(v) == 1 ? 1 : 2;
  int min_ctas = 1;
  if (const char* v = std::getenv("DEEPKERN_LNG_BWD_RING_CLUSTER")) min_ctas = std::max(1, std::atoi(v));
  g.ctas = std::max((nvec + 1023) / 1024, std::min(min_ctas, std::max(1, nvec / 64)));
  auto cta_threads = [&](int ctas) {
    return ((nvec + ctas - 1) / ctas + g.iters - 1) / g.iters;
  };
  if (g.ctas > 1)
    while (g.ctas < lngelu::kMaxClusterRing && cta_threads(g.ctas) > 128 &&
           512 % ((cta_threads(g.ctas) + 31) / 32 * 32) != 0)
      ++g.ctas;
#ifdef DEEPKERN_HAS_SM90A
  const bool clusters = cc_major(device) == 9;
#else
  const bool clusters = false;
#endif
  if (g.ctas > lngelu::kMaxClusterRing || (g.ctas > 1 && !clusters) || rows * g.ctas > INT32_MAX) return {};
  const int part = (nvec + g.ctas - 1) / g.ctas;  // vectors per CTA
  g.tpr = ((part + g.iters - 1) / g.iters + 31) / 32 * 32;
  g.rows_per_cta = g.ctas > 1 ? 1 : std::max(1, 1024 / g.iters / g.tpr);
  g.threads = g.tpr * g.rows_per_cta;
  return g;
}

// Makes `cfg` launch clusters of `ctas` CTAs along x (`attr` must outlive the launch).
void set_cluster(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, int ctas) {
  attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim = {static_cast<unsigned>(ctas), 1, 1};
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
}

// Clusters (or CTAs) of `kernel` resident at once, at most what `rows` need; 0 if none fits.
// Cached per (kernel, geometry, device): the occupancy calls cost host time on every call.
template <typename Kernel>
int64_t ring_groups(Kernel kernel, const Ring& g, size_t smem, size_t max_smem, int64_t rows, int device) {
  using Key = std::tuple<const void*, int, size_t, int, int>;
  static std::mutex mutex;
  static std::map<Key, int64_t> cache;
  const Key key{reinterpret_cast<const void*>(kernel), g.threads, smem, g.ctas, device};
  int64_t resident = -1;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache.find(key); it != cache.end()) resident = it->second;
  }
  // Shared memory a CTA may opt into, less ~1 KB for the kernel's static arrays (768 bytes):
  // 227 KB on the H100, 163 KB on the A100, 99 KB on sm_86/sm_89 (there the largest rings do
  // not fit and those launches take the other kernels).
  const size_t optin = static_cast<size_t>(cached_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device)) - 1024;
  if (resident < 0 && smem > optin) resident = 0;
  if (resident < 0) {
    // The kernel's largest ring (as far as the device allows), once per kernel and device
    // (cudaFuncSetAttribute is per device; a smaller value set later would break launches
    // sized by an earlier one).
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(std::min(max_smem, optin))));
    if (g.ctas > 1) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      cudaLaunchConfig_t cfg = {};
      cudaLaunchAttribute attr;
      set_cluster(cfg, attr, g.ctas);
      cfg.blockDim = dim3(g.threads);
      cfg.gridDim = dim3(static_cast<unsigned>(g.ctas * num_sms(device)));
      cfg.dynamicSmemBytes = smem;
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &cfg));
      resident = n;
    } else {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, g.threads, smem));
      resident = static_cast<int64_t>(per_sm) * num_sms(device);
    }
    const std::lock_guard<std::mutex> lock(mutex);
    cache[key] = resident;
  }
  const int64_t groups = std::min<int64_t>(resident, (rows + g.rows_per_cta - 1) / g.rows_per_cta);
  if (std::getenv("DEEPKERN_LNG_DEBUG")) {  // once per geometry
    char line[160];
    std::snprintf(line, sizeof(line), "layernorm_gelu ring: threads %d (tpr %d x %d rows) x %d ctas, iters %d, smem %zu, resident %lld\n",
                  g.threads, g.tpr, g.rows_per_cta, g.ctas, g.iters, smem, static_cast<long long>(resident));
    static thread_local std::string last;
    if (last != line) std::fputs(line, stderr), last = line;
  }
  return groups;
}

template <typename Kernel, typename Params>
void ring_launch(Kernel kernel, const Ring& g, int64_t groups, size_t smem, cudaStream_t stream,
                 const Params& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(groups * g.ctas));
  cfg.blockDim = dim3(g.threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  if (g.ctas > 1) set_cluster(cfg, attr, g.ctas);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p, g.tpr, g.ctas));
}

// Ring bytes: per thread and stage, ITERS vectors of x and of dy, and the row's mean and rstd.
constexpr size_t ring_bytes(int iters, int threads) {
  return static_cast<size_t>(lngelu::kRingStages) * threads * (2 * iters * 16 + 8);
}

// Returns the number of partial rows, 0 where the ring kernel does not apply. alloc_parts(n)
// allocates n partial rows and points p's dw_part/db_part at them.
template <typename T, typename PT, bool TANH, typename Alloc>
int64_t launch_bwd_ring(BwdParams& p, int device, cudaStream_t stream, Alloc&& alloc_parts) {
  const Ring g = ring_geometry(p.n / (16 / static_cast<int>(sizeof(T))), p.rows, device);
  if (g.iters == 0) return 0;
  auto run = [&](auto iters_c) -> int64_t {
    constexpr int kIters = decltype(iters_c)::value;
    const auto kernel = lngelu::bwd_ring_kernel<T, PT, kIters, TANH>;
    const size_t smem = ring_bytes(kIters, g.threads);
    const int64_t groups = ring_groups(kernel, g, smem, ring_bytes(kIters, 1024 / kIters), p.rows, device);
    if (groups == 0) return 0;
    const int64_t walkers = groups * g.rows_per_cta;
    alloc_parts(walkers);
    ring_launch(kernel, g, groups, smem, stream, p);
    return walkers;
  };
  return g.iters == 2 ? run(std::integral_constant<int, 2>{}) : run(std::integral_constant<int, 1>{});
}

// Rows too long for fwd_rows_kernel: fwd_split_kernel with the row split over a thread cluster
// of up to 8 CTAs (sm_90a builds on sm_90 GPUs; 8 vectors per thread at up to 256 threads per
// CTA, so rows up to 8 x 8 x 256 vectors: 131072 16-bit or 65536 fp32 values), else one CTA
// of up to 512 threads with 16 vectors each (16-bit rows up to 65536); longer rows:
// fwd_loop_kernel. (4 vectors per thread, 8 CTAs per 65536 row: 621 us vs 511 at 4096x65536.)
constexpr int kSplitIters = 8, kSplitThreads = 256, kMaxCluster = 8;
constexpr int kWideIters = 16, kWideThreads = 512;
constexpr int kPairIters = 4;  // vectors per thread and row of the two-row split kernel

// Vectors per thread of fwd_split_kernel<kSplitIters> for a CTA part of `part` vectors: the
// largest of 8..4 that divides it into whole warps of at most kSplitThreads threads, else 8.
// H100 bf16 32768x5120 (640 vectors): 8 per thread leave 16 of 96 threads idle in every
// instruction of the issue-bound kernel; 5 per thread fill 128.
inline int split_iters(int part) {
  for (int k = kSplitIters; k >= 4; --k)
    if (part % k == 0 && (part / k) % 32 == 0 && part / k <= kSplitThreads) return k;
  return kSplitIters;
}

template <typename T, typename PT, bool TANH>
bool launch_fwd_split(const FwdParams& p, int device, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int nvec = p.n / VEC;
  auto threads_for_part = [](int vecs, int iters) { return ((vecs + iters - 1) / iters + 31) / 32 * 32; };
  const int ctas = (nvec + kSplitIters * kSplitThreads - 1) / (kSplitIters * kSplitThreads);
  const int part = (nvec + ctas - 1) / ctas, iters = split_iters(part);
  int max_cluster = kMaxCluster;  // tuning and tests: DEEPKERN_LNG_FWD_CLUSTER (1: no clusters)
  if (const char* env = std::getenv("DEEPKERN_LNG_FWD_CLUSTER")) max_cluster = std::atoi(env);
  // One row per CTA: launch bounds of 4 CTAs per SM (64 registers, ~116 bytes of spills) or 3
  // (80 registers, none). H100 bf16, us, 4 / 3: 16384x8192 206 / 196, 8192x12288 156 / 152,
  // 16384x4096 110 / 106, 8192x32768 (2 CTAs per row) 442 / 427; but 32768x5120 (5 vectors per
  // thread, 128 threads) 253 / 261, 16384x20480 (5 per thread, 2 CTAs) 538 / 546, 4096x65536 (4
  // CTAs) 466 / 473, 2048x131072 (8 CTAs) 492 / 510. So 3 for full parts over at most 2 CTAs.
  auto one_row = [&]() {
    return iters == kSplitIters && ctas <= 2 ? lngelu::fwd_split_kernel<T, PT, kSplitIters, 1, TANH, 3>
                                             : lngelu::fwd_split_kernel<T, PT, kSplitIters, 1, TANH>;
  };
  if (ctas == 1) {
    one_row()<<<p.rows, threads_for_part(nvec, iters), 0, stream>>>(p, 1, iters);
    return true;
  }
  // Clusters only where the sm_90a code runs: the kernel's cluster code is compiled for
  // __CUDA_ARCH__ >= 900, and e.g. an sm_80 PTX JIT-compiled for a Hopper GPU lacks it.
#ifdef DEEPKERN_HAS_SM90A
  constexpr bool kClusterBuild = true;
#else
  constexpr bool kClusterBuild = false;
#endif
  // Rows split over >= 2 CTAs with a residual: two rows per CTA where the cluster can double
  // (see fwd_split_kernel). H100, bf16 with residual, one row / two rows per CTA, us:
  // 16384x16392 1052 / 894, 16384x20000 1213 / 1051, 8192x32768 948 / 826, 4096x40000 617 /
  // 534, 4096x65536 952 / 827 (fp16 951 / 827). Without a residual no gain (4096x65536 480 /
  // 484, 8192x32768 459 / 453, 4096x40000 330 / 338, 16384x20480 563 / 570), so one row.
  // DEEPKERN_LNG_FWD_PAIR=0|1 (tuning, tests): never / always where the cluster can double.
  const char* pair_env = std::getenv("DEEPKERN_LNG_FWD_PAIR");
  const bool pair = ctas >= 2 && (pair_env ? std::atoi(pair_env) != 0 : p.res != nullptr) &&
                    2 * ctas <= std::min(max_cluster, kMaxCluster);
  if (kClusterBuild && cc_major(device) == 9 && ctas <= std::min(max_cluster, kMaxCluster)) {
    const int rows_per_cta = pair ? 2 : 1, cluster = rows_per_cta * ctas;
    int cta_part = part, cta_iters = iters;
    if (pair) {  // the largest of 4..2 vectors per thread that fills whole warps, else 4
      cta_part = (nvec + cluster - 1) / cluster;
      cta_iters = kPairIters;
      for (int k = kPairIters; k >= 2; --k)
        if (cta_part % k == 0 && (cta_part / k) % 32 == 0 && cta_part / k <= kSplitThreads) {
          cta_iters = k;
          break;
        }
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>((p.rows + rows_per_cta - 1) / rows_per_cta * cluster));
    cfg.blockDim = dim3(threads_for_part(cta_part, cta_iters));
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    set_cluster(cfg, attr, cluster);
    if (pair)
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, lngelu::fwd_split_kernel<T, PT, kPairIters, 2, TANH>, p, cluster, cta_iters));
    else
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, one_row(), p, cluster, cta_iters));
    return true;
  }
  if constexpr (sizeof(T) == 2) {
    if (nvec <= kWideIters * kWideThreads) {
      lngelu::fwd_split_kernel<T, PT, kWideIters, 1, TANH>
          <<<p.rows, threads_for_part(nvec, kWideIters), 0, stream>>>(p, 1, kWideIters);
      return true;
    }
  }
  return false;
}

template <typename T, typename PT, int VEC, bool TANH>
void launch_fwd(const FwdParams& p, const RowsConfig& cfg, int device, cudaStream_t stream) {
  // Rows of >= 256 vectors: fwd_split_kernel. H100 bf16 (commit bcd720f), split vs
  // fwd_rows_kernel: 65536x2048 204 vs 241 us, 32768x3072 157 vs 188, 32768x4096 204 vs 212,
  // 32768x5120 255 vs 274, 16384x6144 155 vs 167; 65536x1024 (128 vectors) 116 vs 104, so
  // shorter rows keep the rows kernel. DEEPKERN_LNG_FWD_SPLIT (tuning): 1 always, 0 only past
  // the rows kernel's limit.
  int split_from = 256;
  if (const char* env = std::getenv("DEEPKERN_LNG_FWD_SPLIT")) split_from = std::atoi(env) ? 0 : INT32_MAX;
  if (cfg.iters == 0 || p.n / VEC >= split_from) {
    if constexpr (VEC == 16 / sizeof(T)) {
      if (p.rows * 8 <= INT32_MAX && launch_fwd_split<T, PT, TANH>(p, device, stream)) return;
    }
    lngelu::fwd_loop_kernel<T, VEC, TANH><<<p.rows, 1024, 0, stream>>>(p);
    return;
  }
  const int threads = threads_for(cfg);
  const int rows_per_cta = threads / cfg.tpr;
  const int64_t ctas = (p.rows + rows_per_cta - 1) / rows_per_cta;
  switch (cfg.iters) {
    case 1: lngelu::fwd_rows_kernel<T, PT, VEC, 1, TANH><<<ctas, threads, 0, stream>>>(p, cfg.tpr); break;
    case 2: lngelu::fwd_rows_kernel<T, PT, VEC, 2, TANH><<<ctas, threads, 0, stream>>>(p, cfg.tpr); break;
    case 4: lngelu::fwd_rows_kernel<T, PT, VEC, 4, TANH><<<ctas, threads, 0, stream>>>(p, cfg.tpr); break;
    default: lngelu::fwd_rows_kernel<T, PT, VEC, 8, TANH><<<ctas, threads, 0, stream>>>(p, cfg.tpr);
  }
}

// Persistent launch: as many walkers as fit on the GPU at once (capped by the rows).
template <typename Kernel>
int64_t walkers_for(Kernel kernel, const RowsConfig& cfg, int64_t rows, int device, int64_t& ctas) {
  const int threads = threads_for(cfg);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int rows_per_cta = threads / cfg.tpr;
  ctas = std::min<int64_t>((rows + rows_per_cta - 1) / rows_per_cta,
                           static_cast<int64_t>(std::max(per_sm, 1)) * num_sms(device));
  return ctas * rows_per_cta;
}

// Returns the number of partial rows written.
template <typename T, typename PT, int VEC, bool TANH>
int64_t launch_bwd(BwdParams p, const RowsConfig& cfg, const at::Tensor& x, int device,
                   cudaStream_t stream, at::Tensor& dw_part, at::Tensor& db_part,
                   at::Tensor& stats) {
  const auto f32 = x.options().dtype(at::kFloat);
  auto alloc_parts = [&](int64_t slots) {
    if (p.w) dw_part = at::empty({slots, p.n}, f32);
    if (p.b) db_part = at::empty({slots, p.n}, f32);
    p.dw_part = p.w ? dw_part.data_ptr<float>() : nullptr;
    p.db_part = p.b ? db_part.data_ptr<float>() : nullptr;
  };
  if constexpr (VEC == 16 / sizeof(T)) {
    const int64_t walkers = launch_bwd_ring<T, PT, TANH>(p, device, stream, alloc_parts);
    if (walkers > 0) return walkers;
  }
  if (cfg.iters != 0) {
    auto run = [&](auto kernel) {
      int64_t ctas = 0;
      const int64_t walkers = walkers_for(kernel, cfg, p.rows, device, ctas);
      alloc_parts(walkers);
      kernel<<<ctas, threads_for(cfg), 0, stream>>>(p, cfg.tpr);
      return walkers;
    };
    switch (cfg.iters) {
      case 1: return run(lngelu::bwd_rows_kernel<T, PT, VEC, 1, TANH>);
      case 2: return run(lngelu::bwd_rows_kernel<T, PT, VEC, 2, TANH>);
      default: return run(lngelu::bwd_rows_kernel<T, PT, VEC, 4, TANH>);
    }
  }
  stats = at::empty({2, p.rows}, f32);
  p.row_c1 = stats.data_ptr<float>();
  p.row_c2 = p.row_c1 + p.rows;
  lngelu::bwd_stats_kernel<T, VEC, TANH><<<p.rows, 1024, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 256;
  const int64_t col_blocks = (p.n / VEC + threads - 1) / threads;
  // Enough row groups for ~4 CTAs per SM; each group's partials cost n floats.
  const int64_t want = std::max<int64_t>(1, 4 * num_sms(device) / col_blocks);
  const int64_t groups = std::min<int64_t>(want, p.rows);
  const int64_t rows_per_group = (p.rows + groups - 1) / groups;
  const int64_t slots = (p.rows + rows_per_group - 1) / rows_per_group;
  alloc_parts(slots);
  lngelu::bwd_tiles_kernel<T, VEC, TANH><<<dim3(col_blocks, slots), threads, 0, stream>>>(p, rows_per_group);
  return slots;
}

template <typename F>
void with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "layernorm_gelu: unsupported dtype ", dtype);
  }
}

// Calls f(T{}, PT{}, VEC constant, TANH constant) for the runtime dtype, parameter dtype,
// vector width and GELU variant.
template <typename F>
void dispatch(at::ScalarType dtype, bool params_fp32, bool vectorized, bool tanh_approx, F&& f) {
  auto with_vec = [&](auto t, auto pt) {
    using T = decltype(t);
    auto with_tanh = [&](auto vec) {
      if (tanh_approx)
        f(t, pt, vec, std::true_type{});
      else
        f(t, pt, vec, std::false_type{});
    };
    if (vectorized)
      with_tanh(std::integral_constant<int, 16 / sizeof(T)>{});
    else
      with_tanh(std::integral_constant<int, 1>{});
  };
  switch (dtype) {
    case at::kFloat: with_vec(float{}, float{}); break;
    case at::kHalf:
      params_fp32 ? with_vec(__half{}, float{}) : with_vec(__half{}, __half{});
      break;
    case at::kBFloat16:
      params_fp32 ? with_vec(__nv_bfloat16{}, float{}) : with_vec(__nv_bfloat16{}, __nv_bfloat16{});
      break;
    default: TORCH_CHECK(false, "layernorm_gelu: unsupported dtype ", dtype);
  }
}

// ---------------------------------------------------------------------------------------
// Op entry points.

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "layernorm_gelu: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "layernorm_gelu: x must be 2-D [rows, hidden], got ", x.dim(), "-D");
  TORCH_CHECK(x.stride(1) == 1, "layernorm_gelu: x's last dim must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "layernorm_gelu: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= INT32_MAX, "layernorm_gelu: bad hidden size ",
              x.size(1));
  for (const auto* opt : {&weight, &bias}) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = opt->value();
    TORCH_CHECK(t.device() == x.device(), "layernorm_gelu: weight/bias must be on x's device");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous(),
                "layernorm_gelu: weight/bias must be contiguous [hidden]");
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
                "layernorm_gelu: weight/bias must have x's dtype or float32");
  }
  if (weight.has_value() && bias.has_value())
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(),
                "layernorm_gelu: weight and bias must have the same dtype");
}

bool params_fp32(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias) {
  const auto& t = weight.has_value() ? weight : bias;
  return t.has_value() && t->scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_gelu_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    double eps, bool rmsnorm, bool tanh_approx) {
  check_inputs(x, weight, bias);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device() && residual->stride(1) == 1,
                "layernorm_gelu: residual must match x (shape, dtype, device, unit last stride)");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  at::Tensor y = at::empty({rows, n}, x.options());
  at::Tensor h = residual.has_value() ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, h, mean, rstd};

  FwdParams p{};
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.res = residual.has_value() ? residual->data_ptr() : nullptr;
  p.res_stride = residual.has_value() ? residual->stride(0) : 0;
  p.w = weight.has_value() ? weight->data_ptr() : nullptr;
  p.b = bias.has_value() ? bias->data_ptr() : nullptr;
  p.params_fp32 = params_fp32(x, weight, bias);
  p.y = y.data_ptr();
  p.h = residual.has_value() ? h.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.n = n;
  p.eps = static_cast<float>(eps);
  p.rms = rmsnorm;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool vectorized = false;
  with_dtype(x.scalar_type(), [&](auto t) {
    vectorized = vector_ok<decltype(t)>({p.x, p.res, p.w, p.b}, {p.x_stride, p.res_stride}, n);
  });
  dispatch(x.scalar_type(), p.params_fp32, vectorized, tanh_approx, [&](auto t, auto pt, auto vec, auto tanh_c) {
    const RowsConfig cfg = rows_config(n / vec, false);
    launch_fwd<decltype(t), decltype(pt), vec, tanh_c>(p, cfg, device, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_gelu_bwd(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    bool rmsnorm, bool tanh_approx) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device() && dy.stride(1) == 1,
              "layernorm_gelu_bwd: dy must match x (shape, dtype, device, unit last stride)");
  const int64_t rows = x.size(0);
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows &&
                    t->is_contiguous() && t->device() == x.device(),
                "layernorm_gelu_bwd: mean/rstd must be contiguous float32 [rows] on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int n = static_cast<int>(x.size(1));
  at::Tensor dx = at::empty({rows, n}, x.options());
  const auto param_opts = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->options() : x.options();
  };
  at::Tensor dw = weight.has_value() ? at::empty({n}, param_opts(weight)) : at::empty({0}, x.options());
  at::Tensor db = bias.has_value() ? at::empty({n}, param_opts(bias)) : at::empty({0}, x.options());
  if (rows == 0) {
    if (weight.has_value()) dw.zero_();
    if (bias.has_value()) db.zero_();
    return {dx, dw, db};
  }

  BwdParams p{};
  p.dy = dy.data_ptr();
  p.dy_stride = dy.stride(0);
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.w = weight.has_value() ? weight->data_ptr() : nullptr;
  p.b = bias.has_value() ? bias->data_ptr() : nullptr;
  p.params_fp32 = params_fp32(x, weight, bias);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.rows = rows;
  p.n = n;
  p.rms = rmsnorm;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dw_part, db_part, stats;
  int64_t slots = 0;
  bool vectorized = false;
  with_dtype(x.scalar_type(), [&](auto t) {
    vectorized = vector_ok<decltype(t)>({p.x, p.dy, p.w, p.b}, {p.x_stride, p.dy_stride}, n);
  });
  dispatch(x.scalar_type(), p.params_fp32, vectorized, tanh_approx, [&](auto t, auto pt, auto vec, auto tanh_c) {
    const RowsConfig cfg = rows_config(n / vec, true);
    slots = launch_bwd<decltype(t), decltype(pt), vec, tanh_c>(p, cfg, x, device, stream, dw_part,
                                                               db_part, stats);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 block(32, 8);
  const int col_blocks = (n + 31) / 32;
  for (auto [part, out] : {std::pair{&dw_part, &dw}, std::pair{&db_part, &db}}) {
    if (!part->defined()) continue;
    if (out->scalar_type() == at::kFloat)
      lngelu::sum_partials_kernel<float><<<col_blocks, block, 0, stream>>>(
          part->data_ptr<float>(), slots, n, out->data_ptr<float>());
    else if (out->scalar_type() == at::kHalf)
      lngelu::sum_partials_kernel<__half><<<col_blocks, block, 0, stream>>>(
          part->data_ptr<float>(), slots, n, static_cast<__half*>(out->data_ptr()));
    else
      lngelu::sum_partials_kernel<__nv_bfloat16><<<col_blocks, block, 0, stream>>>(
          part->data_ptr<float>(), slots, n, static_cast<__nv_bfloat16*>(out->data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, dw, db};
}

}  // namespace
}  // namespace deepkern

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) {
  m.impl("layernorm_gelu_fwd", &deepkern::layernorm_gelu_fwd);
  m.impl("layernorm_gelu_bwd", &deepkern::layernorm_gelu_bwd);
}
