// Pieces shared by the INT4 kernels (small_m_kernel in int4_matmul.cu, tile_kernel in
// tile.cu): the weight format's unpacking into mma fragments, the mma itself, the launch
// parameters and the split-K sum. The unpacking scheme is described in int4_matmul.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "common/vec.cuh"

namespace deepkern {
namespace int4mm {

constexpr int kChunkK = 128;            // K per lane-quad step: 4 lanes x 32 codes

template <typename T>
struct Traits;
template <>
struct Traits<__half> {
  using T2 = __half2;
};
template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;  // (a & mask) | magic in one LOP3
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// The mma's B operand pairs of an x chunk x0..x7 (4 words): (x0,x4) (x1,x5) for codes (0,4)
// (1,5), then (x2,x6) (x3,x7). x staged in shared memory is stored in this order, so the
// K step reads its operands directly (16 PRMTs per step fewer; the bench at 0ceafb0 reads
// within 1% of before: the M <= 8 kernel is not issue-bound).
__device__ __forceinline__ uint4 permute_x(const uint4& v) {
  return make_uint4(prmt(v.x, v.z, 0x5410), prmt(v.x, v.z, 0x7632), prmt(v.y, v.w, 0x5410), prmt(v.y, v.w, 0x7632));
}

// 16 bytes of weight: not kept in L1 (read once), and the L2 fetches the whole 256-byte
// block, so the lane quad's next loads along the row (64 bytes further each) hit in L2.
__device__ __forceinline__ uint4 load_weight(const uint4* ptr) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

template <typename T, typename S>
__device__ __forceinline__ T to_x_dtype(S s) {
  if constexpr (std::is_same_v<T, S>)
    return s;
  else
    return from_float<T>(to_float(s));
}

// Per (row, 32-code chunk) constants of the unpacking: scale pair and zero offsets.
template <typename T>
struct Dequant {
  using T2 = typename Traits<T>::T2;
  T2 s2;    // (s, s)
  T2 z0;    // fp16: 1024 + z ; bf16: 128 + z   (subtracted from magic + q)
  T2 nz16;  // fp16 only: -(64 + z)             (added to (1024 + 16 q) / 16)

  // z in 0..15. The offsets are built from their bit patterns: 1024 + z is 0x6400 | z in
  // fp16 (spacing 1 in [1024, 2048)), -(64 + z) is 0xD400 | z << 4 (spacing 1/16 in
  // [64, 128)), and 128 + z is 0x4300 | z in bf16.
  __device__ __forceinline__ void init(T s, uint32_t z) {
    if constexpr (std::is_same_v<T, __half>) {
      s2 = __half2half2(s);
      z0 = as_t2<T2>((0x6400u | z) * 0x10001u);
      nz16 = as_t2<T2>((0xD400u | (z << 4)) * 0x10001u);
    } else {
      s2 = __bfloat162bfloat162(s);
      z0 = as_t2<T2>((0x4300u | z) * 0x10001u);
    }
  }

  // The 8 codes of word w as 4 pairs: out[0] = codes (0,4), [1] = (1,5), [2] = (2,6), [3] = (3,7).
  __device__ __forceinline__ void word(uint32_t w, uint32_t out[4]) const {
    if constexpr (std::is_same_v<T, __half>) {
      const T2 inv16 = __float2half2_rn(0.0625f);
      const uint32_t w8 = w >> 8;
      T2 h0 = __hsub2(as_t2<T2>(lop3_and_or(w, 0x000F000Fu, 0x64006400u)), z0);
      T2 h1 = __hfma2(as_t2<T2>(lop3_and_or(w, 0x00F000F0u, 0x64006400u)), inv16, nz16);
      T2 h2 = __hsub2(as_t2<T2>(lop3_and_or(w8, 0x000F000Fu, 0x64006400u)), z0);
      T2 h3 = __hfma2(as_t2<T2>(lop3_and_or(w8, 0x00F000F0u, 0x64006400u)), inv16, nz16);
      out[0] = as_u32(__hmul2(h0, s2));
      out[1] = as_u32(__hmul2(h1, s2));
      out[2] = as_u32(__hmul2(h2, s2));
      out[3] = as_u32(__hmul2(h3, s2));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T2 h = __hsub2(as_t2<T2>(lop3_and_or(w >> (4 * i), 0x000F000Fu, 0x43004300u)), z0);
        out[i] = as_u32(__hmul2(h, s2));
      }
    }
  }
};

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

struct Params {
  const void* x;
  int64_t x_stride;  // elements; multiple of 8, base 16-byte aligned
  const int32_t* packed;
  const void* scales;    // S (half, bf16 or fp32), rounded to x's dtype in the kernel
  int scale_kind;        // 0: x's dtype, 1: the other 16-bit type, 2: fp32
  const uint8_t* zeros;  // nullptr: symmetric (zero point 8)
  const void* bias;      // nullptr, x's dtype or fp32
  bool bias_fp32;
  void* out;    // [M, N] x's dtype, written when splits == 1
  float* part;  // [splits, M, N] fp32 otherwise
  int splits;
  int m, n, k, kw, group;
  int group_shift;  // log2(group), or -1 when the group is all of K (channelwise)
  int k_per_split;  // multiple of kChunkK
  int xs_stride;    // elements between x rows in shared memory: k_per_split + 8 (a 16-byte
                    // pad, so the 8 rows read by one LDS.128 phase sit in different banks)
};

// Bits of scale i (of dtype S) as T: the raw bits when S is T, else rounded to T once. (A
// runtime branch on the scale dtype in the tile kernel instead of this template parameter made
// its fp16 case 7-28% slower at M = 64-4096: 8192x8192 M=1024 623 vs 488 us.)
template <typename T, typename S>
__device__ __forceinline__ uint32_t scale_bits_as(S s) {
  const T v = to_x_dtype<T>(s);
  return *reinterpret_cast<const uint16_t*>(&v);
}
template <typename T, typename S>
__device__ __forceinline__ uint32_t scale_bits(const Params& p, int64_t i) {
  return scale_bits_as<T>(static_cast<const S*>(p.scales)[i]);
}

template <typename T>
__device__ __forceinline__ float load_bias(const Params& p, int n) {
  return p.bias_fp32 ? static_cast<const float*>(p.bias)[n]
                     : to_float(static_cast<const T*>(p.bias)[n]);
}

// Tile kernels (grid: CTA tiles x, y; K splits z): one result of y[m, row], as the fp32
// partial of split blockIdx.z when p.part is set, else (+ bias) in x's dtype.
template <typename T>
__device__ __forceinline__ void store_tile_result(const Params& p, int m, int row, float v) {
  const int64_t o = static_cast<int64_t>(m) * p.n + row;
  if (p.part != nullptr) {
    p.part[blockIdx.z * static_cast<int64_t>(p.m) * p.n + o] = v;
  } else {
    if (p.bias != nullptr) v += load_bias<T>(p, row);
    static_cast<T*>(p.out)[o] = from_float<T>(v);
  }
}

// y = the fp32 partials [splits, M, N] summed in split order (+ bias): the split-K sum, a
// second kernel after every split launch. (The last CTA of each column summing the splits in
// the kernel itself, with self-re-arming counters, was slower in GPU time: each CTA's fence
// and atomic at its end delay the next CTA in its slot. H100, CUDA-graph replays, fused /
// second kernel, us: 8192x28672 M=1 64.8 / 55.7, 8192x8192 M=1 26.0 / 23.3, 4096x4096
// M=64 36.4 / 24.8, 8192x8192 M=64 66.3 / 56.8; M=1024 equal.)
template <typename T>
__global__ void sum_splits_kernel(const Params p, int splits) {
  const int64_t mn = static_cast<int64_t>(p.m) * p.n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += p.part[s * mn + i];  // fixed order
    if (p.bias != nullptr) v += load_bias<T>(p, static_cast<int>(i % p.n));
    static_cast<T*>(p.out)[i] = from_float<T>(v);
  }
}

// Kernels for M > 16. plan_tile (tile.cu) picks the kernel, its CTA tile and the K splits;
// launch_tile runs it (16-bit scales; `p.part` as the plan says): tile_kernel
// (mma.sync, tile.cu; configs 0 and 1) or, on Hopper, wgmma_kernel (wgmma.cu; configs 2-4).
struct TilePlan {
  int config = 0;  // 0, 1: tile.cu's tiles; 2, 3, 4: wgmma_kernel with 64 / 128 / 256 x rows
  int ctas_n = 0, ctas_m = 0;  // grid: weight-row tiles x x-row tiles x splits
  int splits = 1;
  int k_per_split = 0;  // multiple of kChunkK
};
TilePlan plan_tile(int m, int n, int k, int group_shift, int device);
template <typename T>
void launch_tile(const Params& p, const TilePlan& plan, cudaStream_t stream, int device);

// wgmma_kernel's weight rows per CTA (x rows: 64, 128 or 256 by the plan), whether it runs on
// `device` for this group size (sm_90a build, Hopper, groups >= 128 or channelwise), and its launch.
constexpr int kWgmmaBN = 128;
constexpr int64_t kWgmmaMaxStride = int64_t{1} << 22;  // x row stride (elements) it takes
bool wgmma_supported(int device, int group_shift);
template <typename T>
void launch_wgmma(const Params& p, const TilePlan& plan, cudaStream_t stream, int device);

}  // namespace int4mm
}  // namespace deepkern
