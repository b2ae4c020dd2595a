// INT4 GEMM for M > 16 (tile_kernel): y [M, N] = x [M, K] @ W.T (+ bias), same weight format
// and unpacking as the small-M kernel (int4_matmul.cu, which also holds the op entry).
//
// A CTA computes a [kBN weight rows] x [kBM x rows] tile of y^T over its K split, in steps of
// kChunkK = 128. Each step's x tile (kBM x 128, 16-bit) and weight tile (kBN x 128 codes,
// 64 bytes per row) are copied into a kStages-deep shared-memory ring with cp.async (no
// registers held by loads in flight; rows past M or N and K past the split zero-filled).
// A warp owns 32 weight rows (two m16 tiles) and kMT n8 tiles of x rows. As in the small-M
// kernel, lane (g, t) feeds the mma its own 32-wide K chunk (32 t .. 32 t + 31 of the step)
// in unpacking order: its 4 weight rows g, g + 8, g + 16, g + 24 are one LDS.128 each, and
// the x rows' chunks are read as they were copied and permuted in registers (permute_x).
// Each dequantized weight fragment feeds 2 kMT mmas, each x fragment 4.
//
// x is stored swizzled: 16-byte unit u of row r at position u ^ (2 [u >= 8]) ^ (r & 1), so
// the 8 lanes of an LDS.128 phase (g in {2h, 2h + 1}, t = 0..3, the same word j) hit 8
// different bank groups (unswizzled, chunks t and t + 2 of one row share banks, and rows g
// and g + 1 too, 256 bytes apart).
//
// Scales and zero points: each lane loads its 4 rows' values for its chunk one step ahead
// into registers (L2 hits; 4 rows x (2 + 1) bytes per step). Scales in the other 16-bit
// dtype are rounded to x's there (fp32 ones by the op entry, per call), so the fed weight is
// Int4Weight.dequantize(x.dtype) bit for bit when the scales have x's dtype, within one
// rounding of the scale otherwise (as in the small-M kernel). Split-K: fp32 partials summed
// in split order by sum_splits_kernel, deterministic as in the small-M kernel.
//
// Speed (H100): faster than the Triton tiles only up to M ~ 32 (measurements above the tile
// configs; `auto` uses it there). mma.sync at 2 warps per scheduler leaves the tensor pipe
// ~1/3 busy; on Hopper the wgmma kernel (wgmma.cu) takes M > 16.

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "common/async_copy.cuh"
#include "common/device.h"
#include "common/vec.cuh"
#include "int4_matmul/common.cuh"

namespace deepkern {
namespace int4mm {
namespace {

template <int WARPS_N, int WARPS_M, int MT, int STAGES, int MIN_CTAS>
struct TileConfig {
  static constexpr int kWarpsN = WARPS_N, kWarpsM = WARPS_M, kMT = MT, kStages = STAGES;
  static constexpr int kMinCtas = MIN_CTAS;  // CTAs per SM the registers and shared memory allow
  static constexpr int kThreads = 32 * WARPS_N * WARPS_M;
  static constexpr int kBN = 32 * WARPS_N;  // weight rows (outputs n) per CTA
  static constexpr int kBM = 8 * MT * WARPS_M;  // x rows per CTA
  static constexpr int kXBytes = kBM * kChunkK * 2;
  static constexpr int kWBytes = kBN * kChunkK / 2;
  static constexpr int kStageBytes = kXBytes + kWBytes;
  static constexpr int kSmem = kStages * kStageBytes;
  static_assert(kBM * 16 % kThreads == 0 && kBN * 4 % kThreads == 0, "whole copies per thread");
  static_assert(kXBytes % 16 == 0, "16-byte aligned parts");
};

// The tiles, by M (plan_tile): 256 x 32 up to M = 64, 256 x 128 beyond. H100, 8192x8192
// fp16, us at M = 17 / 64 / 128 / 1024 (CUDA graphs; .dev/i4_tile.py, 2026-11-23):
//   256 x 32, 2 CTAs/SM: 41.8 / 57.5 / 100.8 / 676;  256 x 64: 51.8 / 57.0 / 90.8 / 584;
//   256 x 128, 1 CTA/SM: 66.1 / 69.9 / 78.6 / 485 (Triton: 45.2 / 45.9 / 59.9 / 307).
// ncu at M=1024: tensor pipe 37% busy, 2 warps per scheduler, 0.47 eligible: latency-bound.
// Tried, not faster: a 128 x 64 tile (2 CTAs/SM), the two mmas of an x fragment 8 mmas
// apart instead of back to back, scales/zeros staged through shared memory.
using Tile0 = TileConfig<8, 1, 4, 4, 2>;  // 24 KB per stage
using Tile1 = TileConfig<8, 1, 16, 4, 1>;  // 48 KB per stage
constexpr int kTileConfigs = 2;

// Position of 16-byte unit u (0..15) of x row r in its 256-byte shared-memory row.
__device__ __forceinline__ int x_swizzle(int r, int u) { return u ^ (((u >> 3) & 1) << 1) ^ (r & 1); }

// S: the scales' dtype, x's or the other 16-bit one (the op entry rounds fp32 scales first).
template <typename T, typename S, bool HAS_ZEROS, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinCtas) tile_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wn = warp % C::kWarpsN, wm = warp / C::kWarpsN;
  const int n0 = blockIdx.x * C::kBN, m0 = blockIdx.y * C::kBM;
  const int k_begin = blockIdx.z * p.k_per_split;
  const int k_end = min(p.k, k_begin + p.k_per_split);
  const int steps = (k_end - k_begin + kChunkK - 1) / kChunkK;
  const T* x = static_cast<const T*>(p.x);

  auto load_stage = [&](int step) {
    uint8_t* xs = smem + (step % C::kStages) * C::kStageBytes;
    uint8_t* ws = xs + C::kXBytes;
    const int kb = k_begin + step * kChunkK;
#pragma unroll
    for (int i = 0; i < C::kBM * 16 / C::kThreads; ++i) {
      const int e = threadIdx.x + i * C::kThreads;
      const int r = e >> 4, u = e & 15, k = kb + 8 * u, m = m0 + r;
      const bool ok = m < p.m && k < k_end;
      cp_async<16>(xs + r * 256 + 16 * x_swizzle(r, u), ok ? x + static_cast<int64_t>(m) * p.x_stride + k : x, ok);
    }
#pragma unroll
    for (int i = 0; i < C::kBN * 4 / C::kThreads; ++i) {
      const int e = threadIdx.x + i * C::kThreads;
      const int r = e >> 2, u = e & 3, kc = kb + 32 * u, n = n0 + r;
      const bool ok = n < p.n && kc < k_end;
      cp_async<16>(ws + r * 64 + 16 * u, ok ? p.packed + static_cast<int64_t>(n) * p.kw + kc / 8 : p.packed, ok);
    }
  };

  // This lane's weight rows: q = 0, 1 the first m16 tile (g, g + 8), q = 2, 3 the second.
  const int row_w = wn * 32 + g;  // within the CTA tile
  // Scales as 16-bit pairs (rows q = 0,1 | 2,3) and zero points as bytes of one word,
  // loaded one step ahead (3 registers instead of 8). Staging them through shared memory
  // with the step's copies instead was slower (8192x8192, M=64: 63 vs 57 us; M=1024 615 vs 485).
  struct GroupConsts {
    uint32_t s[2];
    uint32_t z;
  };
  auto load_sz = [&](int step) {
    const int kc = k_begin + step * kChunkK + 32 * t;
    const bool valid = step < steps && kc < k_end;
    const int64_t gbase = static_cast<int64_t>(valid && p.group_shift >= 0 ? kc >> p.group_shift : 0) * p.n;
    uint32_t sv[4], z = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int n = n0 + row_w + 8 * q;
      const bool ok = valid && n < p.n;
      sv[q] = ok ? scale_bits<T, S>(p, gbase + n) : 0u;
      z |= (HAS_ZEROS && ok ? static_cast<uint32_t>(p.zeros[gbase + n]) : 8u) << (8 * q);
    }
    return GroupConsts{{sv[0] | sv[1] << 16, sv[2] | sv[3] << 16}, z};
  };

  float acc[2][C::kMT][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < C::kMT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < steps) load_stage(s);
    cp_async_commit();
  }
  GroupConsts consts = load_sz(0);
  const int sw = ((t >> 1) << 1) | (g & 1);  // x_swizzle of unit 4 t + j is 4 t + (j ^ sw)
  const int x_row = wm * 8 * C::kMT + g;  // this lane's x row in n8 tile 0

  for (int step = 0; step < steps; ++step) {
    cp_async_wait<C::kStages - 2>();  // this step's copies have landed (own groups) ...
    __syncthreads();  // ... everyone's, and everyone is done with the slot refilled next
    if (step + C::kStages - 1 < steps) load_stage(step + C::kStages - 1);
    cp_async_commit();
    Dequant<T> d[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint16_t bits = static_cast<uint16_t>(consts.s[q >> 1] >> (16 * (q & 1)));
      d[q].init(*reinterpret_cast<const T*>(&bits), (consts.z >> (8 * q)) & 0xFFu);
    }
    consts = load_sz(step + 1);

    const uint8_t* xs = smem + (step % C::kStages) * C::kStageBytes;
    const uint4* ws = reinterpret_cast<const uint4*>(xs + C::kXBytes);
    uint4 wv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) wv[q] = ws[(row_w + 8 * q) * 4 + t];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j of the chunk: k = 32 t + 8 j .. + 7
      uint32_t a[2][2][4];  // [m16 tile][codes (0,4),(1,5) | (2,6),(3,7)][fragment]
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        uint32_t r0[4], r1[4];
        d[2 * mi].word(reinterpret_cast<const uint32_t*>(&wv[2 * mi])[j], r0);
        d[2 * mi + 1].word(reinterpret_cast<const uint32_t*>(&wv[2 * mi + 1])[j], r1);
        a[mi][0][0] = r0[0], a[mi][0][1] = r1[0], a[mi][0][2] = r0[1], a[mi][0][3] = r1[1];
        a[mi][1][0] = r0[2], a[mi][1][1] = r1[2], a[mi][1][2] = r0[3], a[mi][1][3] = r1[3];
      }
#pragma unroll
      for (int nt = 0; nt < C::kMT; ++nt) {
        const uint4 v = permute_x(
            *reinterpret_cast<const uint4*>(xs + (x_row + 8 * nt) * 256 + 16 * (4 * t + (j ^ sw))));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma16816<T>(acc[mi][nt], a[mi][0], v.x, v.y);
          mma16816<T>(acc[mi][nt], a[mi][1], v.z, v.w);
        }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; none may outlive the CTA

  // acc[mi][nt]: c0, c1 = (weight row row_w + 16 mi; x rows 8 nt + 2 t, + 1), c2, c3 = (row + 8).
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nt = 0; nt < C::kMT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = n0 + row_w + 16 * mi + (i >= 2 ? 8 : 0);
        const int m = m0 + wm * 8 * C::kMT + 8 * nt + 2 * t + (i & 1);
        if (m < p.m && row < p.n) store_tile_result<T>(p, m, row, acc[mi][nt][i]);
      }
}

struct ConfigFacts {
  int bn, bm, min_ctas;
};
constexpr int kWgmmaConfigs = 3;
constexpr ConfigFacts kFacts[kTileConfigs + kWgmmaConfigs] = {
    {Tile0::kBN, Tile0::kBM, Tile0::kMinCtas},
    {Tile1::kBN, Tile1::kBM, Tile1::kMinCtas},
    {kWgmmaBN, 64, 1},  // wgmma_kernel (wgmma.cu)
    {kWgmmaBN, 128, 1},
    {kWgmmaBN, 256, 1},
};

template <typename T, typename S, bool HAS_ZEROS, class C>
void launch_config(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  auto kernel = tile_kernel<T, S, HAS_ZEROS, C>;
  // Opt this kernel into its shared memory once per device (the attribute is per kernel and
  // device; the flags are per instantiation of this function, i.e. per kernel).
  static std::array<std::atomic<bool>, 64> prepared{};
  std::atomic<bool>* flag = device >= 0 && device < 64 ? &prepared[device] : nullptr;
  if (flag == nullptr || !flag->load(std::memory_order_acquire)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
    if (flag != nullptr) flag->store(true, std::memory_order_release);
  }
  const dim3 grid(plan.ctas_n, plan.ctas_m, plan.splits);
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p);
}

template <typename T, typename S, bool HAS_ZEROS>
void launch_zeros(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  if (plan.config == 0)
    launch_config<T, S, HAS_ZEROS, Tile0>(p, plan, stream, device);
  else
    launch_config<T, S, HAS_ZEROS, Tile1>(p, plan, stream, device);
}

template <typename T, typename S>
void launch_scales(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  if (p.zeros != nullptr)
    launch_zeros<T, S, true>(p, plan, stream, device);
  else
    launch_zeros<T, S, false>(p, plan, stream, device);
}

}  // namespace

// Kernel and tile by M (DEEPKERN_INT4_TILE=0|1|2|3|4 overrides, sweeps; 2-4 = wgmma where
// supported, else 1); splits of K (DEEPKERN_INT4_SPLITS overrides) only while the tiles alone
// leave resident CTA slots empty: a power of two whose grid fills the slots most evenly, the
// fewest on ties, >= 4 K steps per split (>= 8 for the wgmma kernel, below).
TilePlan plan_tile(int m, int n, int k, int group_shift, int device) {
  TilePlan plan;
  const bool wgmma = wgmma_supported(device, group_shift) && k < kWgmmaMaxStride;
  // wgmma kernel by x rows per CTA (H100, fp16, CUDA graphs, us; .dev/bm64_ab.py, 2026-11-23
  // (o)), 64 / 128 rows at 8192x8192 / 8192x28672 / 4096x4096 / 14336x4096 / 4096x14336:
  // M=33 39.4 / 103 / 16.2 / 36.0 / 35.4 vs 46.0 / 159 / 19.1 / 38.2 / 48.6; M=64 41.1 / 103 /
  // 17.4 / 36.8 / 35.9 vs 43.9 / 142 / 18.9 / 38.4 / 41.6; M=96 54.0 / 192 / 21.7 / 51.9 / 56.6
  // vs 44.4 / 121 / 19.1 / 39.7 / 39.1. 128 / 256 rows (earlier sweep): M=128 48.7 / 146 / 22.0
  // / 42.8 / 86.7 vs 62.6 / 244 / 25.5 / 51.1 / 100; M=256 74.2 / 278 / 31.2 / 71.4 / 79.6 vs
  // 62.6 / 198 / 28.2 / 54.5 / 137 (4096x14336 then at 8 splits of 4 K steps: the split rule).
  // M = 17-32: the 64-row wgmma tile against tile 0 (mma.sync). H100, fp16, CUDA graphs, us
  // (scripts/int4_ab.py, 2026-11-23 (p)), 8192x8192 / 8192x28672 / 4096x14336 / 14336x4096 /
  // 4096x4096: M=17 29.4 / 87.8 / 28.5 / 26.9 / 14.4 vs 37.2 / 120.0 / 35.1 / 34.4 / 16.9; M=32
  // 29.2 / 81.5 / 26.1 / 26.9 / 15.2 vs 38.3 / 137.9 / 36.4 / 35.3 / 18.4.
  plan.config = !wgmma ? (m <= 64 ? 0 : 1) : m <= 64 ? 2 : m <= 128 ? 3 : 4;
  if (const char* env = std::getenv("DEEPKERN_INT4_TILE")) {
    plan.config = std::clamp(std::atoi(env), 0, kTileConfigs + kWgmmaConfigs - 1);
    if (plan.config >= 2 && !wgmma) plan.config = 1;
  }
  const ConfigFacts& f = kFacts[plan.config];
  plan.ctas_n = (n + f.bn - 1) / f.bn;
  plan.ctas_m = (m + f.bm - 1) / f.bm;
  const int k_steps = (k + kChunkK - 1) / kChunkK;
  const int64_t tiles = static_cast<int64_t>(plan.ctas_n) * plan.ctas_m;
  const int slots = f.min_ctas * num_sms(device);
  int splits = 1;
  if (const char* env = std::getenv("DEEPKERN_INT4_SPLITS")) {
    splits = std::max(1, std::atoi(env));
  } else if (tiles < slots) {
    // The wgmma kernel's splits keep >= 8 K steps: its ring is 5 (3) stages deep and each
    // split adds an fp32 partial of the whole tile. H100, fp16, us, K=4096 N=14336 (112 tiles)
    // at M = 64 / 128 / 256: 8 splits of 4 steps (the old rule) 66.4 / 84.4 / 139, one split
    // 41.9 / 40.9 / 59.4; the shapes whose best was 4 splits of 8 steps keep it (4096x4096,
    // 14336x4096 at M <= 256; .dev/i4_sweep.py, 2026-11-23 (o)).
    const int min_steps = plan.config >= 2 ? 8 : 4;
    double best_eff = 0.0;
    for (int s = 1; s <= 16; s *= 2) {
      if (s > 1 && k_steps / s < min_steps) break;
      const double waves = static_cast<double>(tiles) * s / slots;
      const double eff = waves / std::ceil(waves);
      if (eff > best_eff + 0.02) splits = s, best_eff = eff;
    }
  }
  const int per_split = (k_steps + splits - 1) / splits;
  plan.splits = (k_steps + per_split - 1) / per_split;
  plan.k_per_split = per_split * kChunkK;
  return plan;
}

template <typename T>
void launch_tile(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  if (plan.config >= 2) {
    launch_wgmma<T>(p, plan, stream, device);
    return;
  }
  using Other = std::conditional_t<std::is_same_v<T, __half>, __nv_bfloat16, __half>;
  TORCH_CHECK(p.scale_kind == 0 || p.scale_kind == 1, "int4_matmul (cuda): tile kernels take 16-bit scales");
  if (p.scale_kind == 0)
    launch_scales<T, T>(p, plan, stream, device);
  else
    launch_scales<T, Other>(p, plan, stream, device);
}

template void launch_tile<__half>(const Params&, const TilePlan&, cudaStream_t, int);
template void launch_tile<__nv_bfloat16>(const Params&, const TilePlan&, cudaStream_t, int);

}  // namespace int4mm
}  // namespace deepkern
