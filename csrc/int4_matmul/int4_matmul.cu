// deepkern::int4_matmul (CUDA): y [M, N] = x [M, K] @ W.T (+ bias), W 4-bit (layout v1 of
// python/deepkern/quant/int4.py: packed int32 [N, K/8], code i of a word at bits 4i; scales
// [G, N]; zeros uint8 [G, N] or none = 8), read in place: no repack. This file: the kernel
// for M <= 16 (small_m_kernel) and the op entry; M > 16 runs the tile kernels of tile.cu.
//
// The weight streams through tensor cores with the roles swapped: mma.m16n8k16 takes 16
// weight rows as A (from registers) and up to 8 rows of x as B, so M = 1..16 costs one or two
// n8 tiles. Each lane (g = lane / 4, t = lane % 4) loads 16 bytes = 32 codes of rows g and
// g + 8 over its own 32-wide K chunk (the 4 lanes of a row cover 128 consecutive K). A dot
// product does not care which k sits in which mma k-slot as long as A and B agree, so a lane
// feeds its own chunk, in the order the cheapest unpacking gives it:
//   codes (0,4) = (w & 0x000F000F) | 0x64006400        -> halves 1024 + q          (fp16)
//   codes (1,5) = (w & 0x00F000F0) | 0x64006400        -> halves 1024 + 16 q
//   codes (2,6), (3,7): the same on w >> 8
// (bf16: 128 + q from 0x4300 with a shift per pair; 128 + 16 q does not fit 7 mantissa bits),
// and the x fragment is permuted to match (permute_x: x staged in shared memory, M <= 8, is
// stored permuted; x read from global memory takes one PRMT per pair). Unpacking is
// exact and (q - z) * s is rounded once, so the weight fed to the mma equals
// Int4Weight.dequantize(x.dtype) bit for bit when the scales have x's dtype (others are
// rounded to it first: within one rounding). Accumulation is fp32.
//
// Latency: each lane double-buffers its weights in registers (the next batch of K steps is
// loaded before this one is unpacked) and, for M <= 8, the CTA stages its split of x in
// shared memory once. Split-K keeps every SM streaming at M = 1: fp32 partials
// [splits, M, N] are summed in split order by a second kernel (sum_splits_kernel, common.cuh),
// so results are deterministic.
// Measured history and what did not work: docs/perf-notes/int4_matmul.md.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "common/device.h"
#include "common/vec.cuh"
#include "int4_matmul/common.cuh"

namespace deepkern {
namespace int4mm {

constexpr int kMaxSmallM = 16;  // small_m_kernel up to here (two n8 tiles), tile.cu beyond
constexpr int kWarps = 4;               // a CTA: 4 warps x 16 weight rows = 64 rows of N
constexpr int kRowsPerCta = 16 * kWarps;

// One U x 128-wide K batch of a lane's weights and per-chunk constants, loaded ahead of use.
template <typename S, int U>
struct Batch {
  uint4 w0[U], w1[U];  // rows row0 / row1: 32 codes each
  S s0[U], s1[U];
  uint8_t z0[U], z1[U];
};

template <typename S, bool HAS_ZEROS, int U>
__device__ __forceinline__ void load_batch(const Params& p, int kb, int k_end, int t, int row0, bool ok0,
                                           bool ok1, const uint4* w0_ptr, const uint4* w1_ptr,
                                           Batch<S, U>& b) {
  const S* scales = static_cast<const S*>(p.scales);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int kc = kb + u * kChunkK + 32 * t;  // this lane's chunk
    const bool valid = kc < k_end;
    b.w0[u] = valid && ok0 ? load_weight(w0_ptr + kc / 32) : make_uint4(0, 0, 0, 0);
    b.w1[u] = valid && ok1 ? load_weight(w1_ptr + kc / 32) : make_uint4(0, 0, 0, 0);
    // group index: a shift (power-of-two groups), or 0 (channelwise: one group)
    const int64_t gi = static_cast<int64_t>(valid && p.group_shift >= 0 ? kc >> p.group_shift : 0) * p.n + row0;
    b.s0[u] = ok0 && valid ? scales[gi] : S{};
    b.s1[u] = ok1 && valid ? scales[gi + 8] : S{};
    if constexpr (HAS_ZEROS) {
      b.z0[u] = ok0 && valid ? p.zeros[gi] : 8;
      b.z1[u] = ok1 && valid ? p.zeros[gi + 8] : 8;
    } else {
      b.z0[u] = b.z1[u] = 8;
    }
  }
}

// MT n8 tiles of x rows (M <= 8 * MT); S the scales' dtype (converted to T per chunk).
// Register double buffering: batch i + 1 is loaded before batch i is unpacked, so every
// lane keeps 2 x U x 32 bytes of weight in flight.
// CTAs per SM the register budget is set for: 4 (<= 128 registers; 86-112 used on sm_90a).
constexpr int kCtasPerSm = 4;

// KSPLIT = 1: the CTA's warps take 16 weight rows each (64 rows per CTA). KSPLIT = kWarps:
// they share 16 rows and take every kWarps-th batch of the split's K steps, their sums added
// in warp order through shared memory at the end (no fp32 partials for the K the CTA covers).
template <int KSPLIT>
constexpr int rows_per_cta() { return KSPLIT == 1 ? kRowsPerCta : 16; }

template <typename T, typename S, bool HAS_ZEROS, int MT, int U, int KSPLIT>
__global__ void __launch_bounds__(32 * kWarps, kCtasPerSm) small_m_kernel(const Params p) {
  static_assert(KSPLIT == 1 || KSPLIT == kWarps, "warps split rows or K");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * rows_per_cta<KSPLIT>() + (KSPLIT == 1 ? warp * 16 : 0) + g;
  const int row1 = row0 + 8;
  const bool ok0 = row0 < p.n, ok1 = row1 < p.n;
  const int k_begin = blockIdx.y * p.k_per_split;
  const int k_end = min(p.k, k_begin + p.k_per_split);
  const T* x = static_cast<const T*>(p.x);
  const uint4* w0_ptr = reinterpret_cast<const uint4*>(p.packed + static_cast<int64_t>(ok0 ? row0 : 0) * p.kw);
  const uint4* w1_ptr = reinterpret_cast<const uint4*>(p.packed + static_cast<int64_t>(ok1 ? row1 : 0) * p.kw);

  float acc[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  // This warp's first batch, and the stride between its batches.
  const int k_first = k_begin + (KSPLIT == 1 ? 0 : warp * U * kChunkK);
  constexpr int kStride = KSPLIT * U * kChunkK;
  Batch<S, U> cur, next;
  load_batch<S, HAS_ZEROS, U>(p, k_first, k_end, t, row0, ok0, ok1, w0_ptr, w1_ptr, cur);

  // x [M, k_begin:k_end] staged in shared memory once, while the first weights are in
  // flight: read from global inside the loop, its L2 latency was paid twice per batch
  // (8192x8192, M=1: 26.8 -> 25.7 us kernel time). Two x tiles (M > 8) read global memory:
  // 16 staged rows capped the split length and cost more than they saved (36.6 -> 46.8 us).
  constexpr bool kStageX = MT == 1;
  extern __shared__ uint4 x_smem[];
  if constexpr (kStageX) {
    const int chunks = (k_end - k_begin) / 8;  // 16-byte pieces per row (K % 32 == 0)
    for (int e = threadIdx.x; e < p.m * chunks; e += blockDim.x) {
      const int m = e / chunks, c = e % chunks;
      x_smem[m * (p.xs_stride / 8) + c] =
          permute_x(__ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * p.x_stride + k_begin) + c));
    }
    __syncthreads();
  }
  const T* xs = reinterpret_cast<const T*>(x_smem);

  for (int kb = k_first; kb < k_end; kb += kStride) {
    if (kb + kStride < k_end)
      load_batch<S, HAS_ZEROS, U>(p, kb + kStride, k_end, t, row0, ok0, ok1, w0_ptr, w1_ptr, next);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kc = kb + u * kChunkK + 32 * t;
      const bool valid = kc < k_end;
      Dequant<T> d0, d1;
      d0.init(to_x_dtype<T>(cur.s0[u]), cur.z0[u]);
      d1.init(to_x_dtype<T>(cur.s1[u]), cur.z1[u]);
      // x rows g and g + 8 (tile 1) over this lane's chunk: 4 x 16 bytes each.
      uint4 xv[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = g + 8 * mt;
        const uint4* xp = kStageX ? reinterpret_cast<const uint4*>(xs + m * p.xs_stride + (kc - k_begin))
                                  : reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * p.x_stride + kc);
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[mt][j] = valid && m < p.m ? xp[j] : make_uint4(0, 0, 0, 0);
      }
      const uint32_t* a_words = reinterpret_cast<const uint32_t*>(&cur.w0[u]);
      const uint32_t* b_words = reinterpret_cast<const uint32_t*>(&cur.w1[u]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // word j: k = kc + 8 j .. kc + 8 j + 7
        uint32_t r0[4], r1[4];
        d0.word(a_words[j], r0);
        d1.word(b_words[j], r1);
        const uint32_t a_lo[4] = {r0[0], r1[0], r0[1], r1[1]};  // k-slots: codes 0,4 | 1,5
        const uint32_t a_hi[4] = {r0[2], r1[2], r0[3], r1[3]};  // codes 2,6 | 3,7
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4 v = kStageX ? xv[mt][j] : permute_x(xv[mt][j]);  // staged: permuted already
          mma16816<T>(acc[mt], a_lo, v.x, v.y);
          mma16816<T>(acc[mt], a_hi, v.z, v.w);
        }
      }
    }
    cur = next;
  }

  if constexpr (KSPLIT > 1) {
    // Warps 1.. hand their sums to warp 0, which adds them in warp order.
    __shared__ float red[KSPLIT - 1][MT][4][32];
    if (warp > 0)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp - 1][mt][i][lane] = acc[mt][i];
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int w = 0; w < KSPLIT - 1; ++w)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] += red[w][mt][i][lane];
  }
  // acc[mt]: c0, c1 = (row0; x rows 8 mt + 2t, + 1), c2, c3 = (row1; same x rows).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = 8 * mt + 2 * t + (i & 1);
      const int row = i < 2 ? row0 : row1;
      if (m >= p.m || row >= p.n) continue;
      const int64_t o = static_cast<int64_t>(m) * p.n + row;
      if (p.part != nullptr) {
        p.part[static_cast<int64_t>(blockIdx.y) * p.m * p.n + o] = acc[mt][i];
      } else {
        float v = acc[mt][i];
        if (p.bias != nullptr) v += load_bias<T>(p, row);
        static_cast<T*>(p.out)[o] = from_float<T>(v);
      }
    }
  }
}


// x of a split is staged in shared memory: at most kMaxXSmem bytes per CTA, so that the
// 3-4 CTAs per SM of the register budget also fit (M=16: <= 11 K steps per split), and
// below the 48 KiB a launch may take without opting in.
constexpr int kMaxXSmem = 46 * 1024;

int max_split_steps(int m) { return m > 8 ? 1 << 20 : std::max(1, (kMaxXSmem / (2 * m) - 8) / kChunkK); }

// K steps per batch (U): 4 with one x tile (8192x8192, M=1: 25.1 vs 26.9 us with 2), 2 with
// two (4 spills under the 128-register cap, so it is not built). DEEPKERN_INT4_BATCH=2|4
// overrides for one x tile (sweeps).
int batch_steps(int mt) {
  const char* env = std::getenv("DEEPKERN_INT4_BATCH");
  if (env != nullptr) return std::atoi(env) == 4 ? 4 : 2;
  return mt == 1 ? 4 : 2;
}

// Splits of K. M <= 4: one batch of K steps per CTA, so every CTA issues all of its loads at
// once and the many small CTAs balance across the SMs (H100, CUDA graphs, M=1, against the
// power-of-two rule below: 4096x14336 21.3 vs 24.5 us, 8192x8192 23.4 vs 25.8, 8192x28672
// 56.4 vs 59.4, 14336x4096 22.8 vs 26.8, 28672x8192 58.5 vs 62.9, 4096x4096 equal; at M=8
// the extra fp32 partials made it 3-5% slower on 2 of 6 shapes, at M=4 within 2%).
// Otherwise a power of two (even splits) whose grid fills the resident CTA slots most evenly,
// the fewest on ties (a mostly idle last wave costs more than partials).
// DEEPKERN_INT4_SPLITS=N overrides (sweeps).
int choose_splits(int n, int k, int m, int slots, int ksplit) {
  const int k_steps = (k + kChunkK - 1) / kChunkK;
  const int min_splits = (k_steps + max_split_steps(m) - 1) / max_split_steps(m);
  if (const char* env = std::getenv("DEEPKERN_INT4_SPLITS")) return std::max(min_splits, std::atoi(env));
  const int per_cta = batch_steps(1) * ksplit;  // K steps of one batch per warp
  if (m <= 4) return std::max(min_splits, (k_steps + per_cta - 1) / per_cta);
  const int ctas_n = (n + kRowsPerCta / ksplit - 1) / (kRowsPerCta / ksplit);
  if (ksplit > 1 && m > 8) {
    // No splits (no fp32 partials, no second kernel) while the 16-row CTAs cover every SM:
    // the fewest splits that do (see ksplit_for; the wave rule below chose 2 at the shapes
    // measured, slower on 3 of 5).
    int s = std::max(1, min_splits);
    while (static_cast<int64_t>(ctas_n) * s < slots / kCtasPerSm && k_steps / (2 * s) >= 4) s *= 2;
    return s;
  }
  int best = min_splits;
  double best_eff = 0.0;
  for (int s = 1; s <= 16; s *= 2) {
    if (s < min_splits || (s > 1 && k_steps / s < 4)) continue;  // >= 4 K steps per split
    const double waves = static_cast<double>(ctas_n) * s / slots;
    const double eff = waves / std::ceil(waves);  // share of the launched slots doing work
    if (eff > best_eff + 0.02) best = s, best_eff = eff;
  }
  return std::max(best, min_splits);
}

// Warps per K split of the small-M kernel (1: warps split rows): kWarps for two x tiles
// (M > 8). H100, CUDA graphs, fp16, us, warps on rows (auto splits) / on K (auto splits, the
// rule below) at M = 16: 4096x4096 17.3 / 16.4, 14.4; 4096x14336 34.2 / 37.3, 31.7; 8192x8192
// 34.6 / 29.9, 29.9; 8192x28672 102.1 / 97.3, 100.0; 14336x4096 30.4 / 30.2, 30.9. At M <= 8
// (one x tile, staged in shared memory) warps on K were slower everywhere (8192x8192 M=1 23.1
// vs 26.5-28.6, M=8 31.6 vs 44.2-46.4). DEEPKERN_INT4_KSPLIT=1|4 overrides (tests, sweeps).
int ksplit_for(int m) {
  if (const char* env = std::getenv("DEEPKERN_INT4_KSPLIT")) return std::atoi(env) == kWarps ? kWarps : 1;
  return m > 8 ? kWarps : 1;
}

template <typename T, typename S, bool HAS_ZEROS, int MT>
void launch(const Params& p, int splits, int ksplit, cudaStream_t stream) {
  const size_t smem = MT == 1 ? static_cast<size_t>(p.m) * p.xs_stride * 2 : 0;  // <= kMaxXSmem
  auto go = [&](auto kernel, int rows) {
    kernel<<<dim3((p.n + rows - 1) / rows, splits), 32 * kWarps, smem, stream>>>(p);
  };
  if constexpr (MT == 1) {
    if (batch_steps(MT) == 4) {
      if (ksplit == kWarps)
        go(small_m_kernel<T, S, HAS_ZEROS, MT, 4, kWarps>, rows_per_cta<kWarps>());
      else
        go(small_m_kernel<T, S, HAS_ZEROS, MT, 4, 1>, rows_per_cta<1>());
      return;
    }
  }
  if (ksplit == kWarps)
    go(small_m_kernel<T, S, HAS_ZEROS, MT, 2, kWarps>, rows_per_cta<kWarps>());
  else
    go(small_m_kernel<T, S, HAS_ZEROS, MT, 2, 1>, rows_per_cta<1>());
}

template <typename T, typename S>
void launch_all(const Params& p, int splits, int ksplit, cudaStream_t stream) {
  const bool z = p.zeros != nullptr;
  if (p.m <= 8)
    z ? launch<T, S, true, 1>(p, splits, ksplit, stream) : launch<T, S, false, 1>(p, splits, ksplit, stream);
  else
    z ? launch<T, S, true, 2>(p, splits, ksplit, stream) : launch<T, S, false, 2>(p, splits, ksplit, stream);
}

}  // namespace int4mm

namespace {

at::Tensor int4_matmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                       const std::optional<at::Tensor>& zeros, int64_t group,
                       const std::optional<at::Tensor>& bias) {
  using namespace int4mm;
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 2, "int4_matmul: x must be a 2-D CUDA tensor");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "int4_matmul (cuda): x must be float16 or bfloat16, got ", x_in.scalar_type());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = packed.size(0);
  TORCH_CHECK(k % 32 == 0 && k > 0 && k <= INT32_MAX, "int4_matmul (cuda): K must be a multiple of 32, got ", k);
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2 && packed.size(1) == k / 8 &&
                  packed.is_contiguous() && packed.device() == x_in.device(),
              "int4_matmul: packed must be contiguous int32 [N, K/8] on x's device");
  TORCH_CHECK(group == k || (group >= 32 && (group & (group - 1)) == 0 && k % group == 0),
              "int4_matmul (cuda): group must be K or a power of two >= 32 dividing K, got ", group);
  TORCH_CHECK(n > 0 && n <= INT32_MAX, "int4_matmul: bad N ", n);
  TORCH_CHECK(scales_in.dim() == 2 && scales_in.size(0) == k / group && scales_in.size(1) == n &&
                  scales_in.device() == x_in.device(),
              "int4_matmul: scales must be [K/group, N] on x's device");
  if (zeros.has_value())
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales_in.sizes() &&
                    zeros->is_contiguous() && zeros->device() == x_in.device(),
                "int4_matmul: zeros must be contiguous uint8 [K/group, N] on x's device");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->device() == x_in.device() &&
                    (bias->scalar_type() == x_in.scalar_type() || bias->scalar_type() == at::kFloat),
                "int4_matmul: bias must be contiguous [N] in x's dtype or float32 on x's device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
              "int4_matmul (cuda): packed must be 16-byte aligned");

  const c10::cuda::CUDAGuard guard(x_in.device());
  // 16-byte loads of x rows: a unit-stride copy when the rows are not aligned (x is small).
  // (Row strides of kWgmmaMaxStride or more, possible only for views, are copied too.)
  auto aligned = [](const at::Tensor& t) {
    return t.stride(1) == 1 && t.stride(0) % 8 == 0 && t.stride(0) < kWgmmaMaxStride &&
           reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  at::Tensor x = x_in;
  if (!aligned(x)) x = x_in.contiguous();  // a fresh, aligned copy unless x_in was contiguous
  if (!aligned(x)) x = x_in.clone(at::MemoryFormat::Contiguous);  // contiguous view at an odd offset
  // Scales of another dtype are rounded to x's in the kernels; with scales in x's dtype the
  // unpacked weight is exactly dequantize(x.dtype).
  TORCH_CHECK(scales_in.scalar_type() == at::kHalf || scales_in.scalar_type() == at::kBFloat16 ||
                  scales_in.scalar_type() == at::kFloat,
              "int4_matmul: scales must be float16, bfloat16 or float32");

  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  const int device = x.get_device();
  const bool small = m <= kMaxSmallM;
  // M > 16 with fp32 scales: rounded to x's dtype per call (the tile kernels are built for
  // 16-bit scales only; quantize_int4 gives scales in the weight's 16-bit dtype).
  const at::Tensor scales = small || scales_in.scalar_type() != at::kFloat
                                ? scales_in.contiguous()
                                : scales_in.to(x.scalar_type()).contiguous();
  int splits = 1, k_per_split = 0, ksplit = 1;
  TilePlan plan;
  if (small) {
    const int slots = kCtasPerSm * num_sms(device);
    ksplit = ksplit_for(static_cast<int>(m));
    const int splits_wanted = choose_splits(static_cast<int>(n), static_cast<int>(k), static_cast<int>(m), slots, ksplit);
    const int k_steps = static_cast<int>((k + kChunkK - 1) / kChunkK);
    const int per_split = (k_steps + splits_wanted - 1) / splits_wanted;
    splits = (k_steps + per_split - 1) / per_split;
    k_per_split = per_split * kChunkK;
  } else {
    TORCH_CHECK(m <= INT32_MAX, "int4_matmul (cuda): too many rows of x: ", m);
    const int group_shift = group == k ? -1 : __builtin_ctz(static_cast<unsigned>(group));
    plan = plan_tile(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), group_shift, device);
    TORCH_CHECK(plan.ctas_m <= 65535 && plan.splits <= 65535, "int4_matmul (cuda): M=", m, " needs a grid of ",
                plan.ctas_m, " x ", plan.splits, " CTAs (at most 65535 each)");
    splits = plan.splits;
    k_per_split = plan.k_per_split;
  }
  at::Tensor part;
  if (splits > 1) part = at::empty({splits, m, n}, x.options().dtype(at::kFloat));

  Params p{};
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.packed = packed.data_ptr<int32_t>();
  p.scales = scales.data_ptr();
  p.scale_kind = scales.scalar_type() == x.scalar_type() ? 0 : scales.scalar_type() == at::kFloat ? 2 : 1;
  p.zeros = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.bias_fp32 = bias.has_value() && bias->scalar_type() == at::kFloat;
  p.out = out.data_ptr();
  p.part = splits > 1 ? part.data_ptr<float>() : nullptr;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.kw = static_cast<int>(k / 8);
  p.group = static_cast<int>(group);
  p.group_shift = group == k ? -1 : __builtin_ctz(static_cast<unsigned>(group));
  p.k_per_split = k_per_split;
  p.xs_stride = p.k_per_split + 8;
  p.splits = splits;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto run = [&](auto t) {
    using T = decltype(t);
    if (!small) {
      launch_tile<T>(p, plan, stream, device);
    } else {
      switch (scales.scalar_type()) {
        case at::kHalf: launch_all<T, __half>(p, splits, ksplit, stream); break;
        case at::kBFloat16: launch_all<T, __nv_bfloat16>(p, splits, ksplit, stream); break;
        default: launch_all<T, float>(p, splits, ksplit, stream); break;
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t mn = m * n;
      const int blocks = static_cast<int>(std::min<int64_t>((mn + 255) / 256, 4096));
      sum_splits_kernel<T><<<blocks, 256, 0, stream>>>(p, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (x.scalar_type() == at::kHalf)
    run(__half{});
  else
    run(__nv_bfloat16{});
  return out;
}

}  // namespace
}  // namespace deepkern

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) { m.impl("int4_matmul", &deepkern::int4_matmul); }
