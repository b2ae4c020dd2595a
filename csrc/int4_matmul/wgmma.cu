// INT4 GEMM for M > 16 on Hopper (sm_90a builds, cc 9.0 devices): wgmma_kernel, a CTA of
// three warpgroups over 128 weight rows x BM rows of x (64 up to M = 64, 128 up to 128, else 256),
// y^T tile = W tile @ x tile^T.
//
// Warp specialization. The producer warpgroup (40 registers, setmaxnreg) fills a ring of K
// steps (128 of K each): one thread issues TMA copies per step, two 64-wide slabs of x (128-byte
// swizzle: 16-byte chunk c of row r at c ^ (r & 7), wgmma's K-major B layout) and the 128
// weight rows' 64 bytes (64-byte swizzle: chunk c of row r at c ^ ((r >> 1) & 3), so the 8 rows
// of an LDS.128 phase hit 8 bank groups); one warp copies the steps' scales and zero points
// into shared memory with cp.async (one to three warps load and store them where N % 4 != 0
// or they are not aligned). Stages change hands by mbarriers (full: the TMA bytes landed and the
// constants landed; empty: the consumers' wgmmas of that stage retired), never a CTA
// barrier. The two consumer warpgroups (232 registers), 64 weight rows each, dequantize the
// weight straight into wgmma's register operand (A): per k16 slice, lane t takes byte t of
// words 2s and 2s + 1 (codes 2t, 2t + 1 and 2t + 8, 2t + 9: the mma.m16n8k16 A fragment); a
// PRMT puts byte t in both halves, one LOP3 makes the halves 1024 + q and 1024 + 16 q (fp16;
// bf16: 128 + q from a PRMT of w and w >> 4), an HFMA2 (HSUB2) leaves q - z exactly and an
// HMUL2 applies the scale, so the fed weight is Int4Weight.dequantize(x.dtype) bit for bit
// (scales in x's dtype; the other 16-bit dtype is rounded to it first). Slices go in batches
// of 4, one commit group each, with two batches' A registers: a batch is dequantized while the
// previous one's wgmmas run, and its registers are rewritten only after its group retired.
// All A registers of a commit group are written before its wgmma.fence: ptxas otherwise
// serializes the wgmmas (C7513 "non wgmma instructions defining input registers", a wait for
// the tensor cores before every slice; see launch_one for the measured cost).
// H100, fp16, CUDA graphs, us: against the kernel before it (two warpgroups that issued
// cp.async copies themselves, a CTA barrier per step, scales loaded one step ahead; the same
// arithmetic) 8192x8192 M = 128 / 256 / 1024 / 4096 71.1 / 90.7 / 286 / 1168 -> 48.7 / 62.6 /
// 199 / 849 (cuBLAS 62.4 / 65.5 / 187 / 842); scales still loaded by the consumers one step
// ahead: M=128 56.6 (their global loads' latency stalled every step).
// Measured history: docs/perf-notes/int4_matmul.md (sessions l to q).
//
// Groups of >= 128 (and channelwise) only: one scale and zero point per row per K step.
// The y tile goes out through shared memory (stmatrix, 16-byte stores); split-K partials and
// their sum are tile.cu's (common.cuh).
#include <c10/cuda/CUDAException.h>
#include <cuda.h>  // CUtensorMap (encoded on the host through the runtime's driver entry point)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "common/async_copy.cuh"
#include "common/device.h"
#include "common/mbarrier.cuh"
#include "common/vec.cuh"
#include "int4_matmul/common.cuh"

namespace deepkern {
namespace int4mm {
namespace {

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
// Low word: the start address >> 4 (14 bits) and the leading byte offset (1, unused by the
// swizzled K-major layout); high word: the stride (1024 >> 4) and the 128-byte swizzle mode.
// Shared addresses are below 2^18, so adding (offset >> 4) to a low word never carries out of
// the address field: the consumers build one low word per stage and add constants per slice
// (the loop's static SASS: 251 -> 233 instructions per K step; timing unchanged within 2%).
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
__device__ __forceinline__ uint64_t desc_k128(uint32_t lo) {
  return static_cast<uint64_t>(lo) | (static_cast<uint64_t>((1024 >> 4) | (1u << 30)) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Two fp32 values rounded to T, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  typename Traits<T>::T2 v;
  v.x = from_float<T>(lo);
  v.y = from_float<T>(hi);
  return as_u32(v);
}
// Four 8 x 8 16-bit matrices (mma fragment layout, one register each) stored transposed:
// row r of matrix i (16 bytes) at the address of lane 8 i + r.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
#endif
}

// d[64 x N fp32 per warpgroup] += A (registers) x B (descriptor), N = 64, 128 or 256. One asm
// body per N (a macro: the instruction's type must be a string literal), TY "f16" or "bf16".
#define DEEPKERN_WGMMA_N64(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
#define DEEPKERN_WGMMA_N128(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
#define DEEPKERN_WGMMA_N256(TY) \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " " \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <typename T, int N>
__device__ __forceinline__ void wgmma_n(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64) {
    if constexpr (kHalf) DEEPKERN_WGMMA_N64("f16"); else DEEPKERN_WGMMA_N64("bf16");
  } else if constexpr (N == 128) {
    if constexpr (kHalf) DEEPKERN_WGMMA_N128("f16"); else DEEPKERN_WGMMA_N128("bf16");
  } else {
    if constexpr (kHalf) DEEPKERN_WGMMA_N256("f16"); else DEEPKERN_WGMMA_N256("bf16");
  }
#endif
}
#undef DEEPKERN_WGMMA_N64
#undef DEEPKERN_WGMMA_N128
#undef DEEPKERN_WGMMA_N256

// Byte t of a weight word (codes 2t, 2t + 1) as one A register (two x-dtype values), for one
// row's scale and zero point.
template <typename T>
struct ByteDequant {
  uint32_t add;  // fp16: (-(1024 + z), -(64 + z)) added; bf16: (128 + z, 128 + z) subtracted
  uint32_t s2;   // (s, s)
  __device__ __forceinline__ void init(uint32_t s_bits, uint32_t z) {
    s2 = s_bits * 0x10001u;
    if constexpr (std::is_same_v<T, __half>)
      add = (0xE400u | z) | ((0xD400u | (z << 4)) << 16);
    else
      add = (0x4300u | z) * 0x10001u;
  }
  // sel: the PRMT selector of lane t (fp16: byte t everywhere; bf16: byte t of w, of w >> 4).
  __device__ __forceinline__ uint32_t operator()(uint32_t w, uint32_t sel) const {
    using T2 = typename Traits<T>::T2;
    if constexpr (std::is_same_v<T, __half>) {
      // halves 1024 + q_lo and 1024 + 16 q_hi; times (1, 1/16) plus the offsets: q - z exactly
      const uint32_t v = lop3_and_or(prmt(w, w, sel), 0x00F0000Fu, 0x64006400u);
      const T2 h = __hfma2(as_t2<T2>(v), as_t2<T2>(0x2C003C00u), as_t2<T2>(add));
      return as_u32(__hmul2(h, as_t2<T2>(s2)));
    } else {
      const uint32_t v = lop3_and_or(prmt(w, w >> 4, sel), 0x000F000Fu, 0x43004300u);
      const T2 h = __hsub2(as_t2<T2>(v), as_t2<T2>(add));
      return as_u32(__hmul2(h, as_t2<T2>(s2)));
    }
  }
};

constexpr int kThreads = 384;  // producer warpgroup + two consumer warpgroups

// The TMA ring for BM rows of x per CTA (64, 128 or 256).
template <int BM>
struct Ring {
  static constexpr int kStages = BM == 64 ? 8 : BM == 128 ? 5 : 3;  // 8 x 24 KB, 5 x 40 KB, 3 x 72 KB
  static constexpr int kXSlab = BM * 128;            // one 64-wide K slab of x
  static constexpr int kStageBytes = 2 * kXSlab + kWgmmaBN * 64;
  static constexpr int kSmem = kStages * kStageBytes + 1024;  // + slack to align the ring
  static_assert(kStageBytes % 1024 == 0, "stages keep the 1024-byte alignment of the swizzle");
};

// The 2-D box at (inner, outer) of `map` into `dst`, its bytes counted on `bar`.
__device__ __forceinline__ void tma_2d(void* dst, const CUtensorMap* map, int inner, int outer, uint64_t* bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(smem_u32(bar))
      : "memory");
#endif
}

template <typename T, typename S, bool HAS_ZEROS, int BM>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_kernel(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap, const Params p,
                 const bool async_consts) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using R = Ring<BM>;
  constexpr int kConstsWarps = BM <= 128 ? 3 : 1;  // producer warps loading scales/zero points
  constexpr int kStages = R::kStages, kXSlab = R::kXSlab, kStageBytes = R::kStageBytes;
  extern __shared__ uint8_t smem_raw[];
  __shared__ uint64_t full[kStages], empty[kStages];
  // By stage and weight row: the scale (dtype S) and the zero point.
  __shared__ __align__(16) S cscale[kStages][kWgmmaBN];
  __shared__ __align__(16) uint8_t czero[kStages][kWgmmaBN];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const int n0 = blockIdx.x * kWgmmaBN, m0 = blockIdx.y * BM;
  const int k_begin = blockIdx.z * p.k_per_split;
  const int k_end = min(p.k, k_begin + p.k_per_split);
  const int steps = (k_end - k_begin + kChunkK - 1) / kChunkK;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&full[i], 1 + 32);  // the TMA thread (with its bytes) and a constants warp's lanes
      mbar_init(&empty[i], 256);     // every consumer thread (each after its own reads)
    }
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      for (int step = 0; step < steps; ++step) {
        const int st = step % kStages;
        if (step >= kStages) mbar_wait(&empty[st], (step / kStages - 1) & 1);
        uint8_t* dst = smem + st * kStageBytes;
        const int kb = k_begin + step * kChunkK;
        mbar_expect_tx(&full[st], kStageBytes);
        tma_2d(dst, &xmap, kb, m0, &full[st]);
        tma_2d(dst + kXSlab, &xmap, kb + 64, m0, &full[st]);
        tma_2d(dst + 2 * kXSlab, &wmap, kb / 8, n0, &full[st]);
      }
    } else if (async_consts && threadIdx.x >= 32 && threadIdx.x < 64) {
      // The stage's scales and zero points when N % 4 == 0 and the scales (zero points) are 8-
      // (4-) byte aligned: one warp, every step in order; each lane copies 4 rows' scales (8
      // bytes) and zero points (4 bytes) with cp.async and arrives when they land, so the warp
      // never waits for memory. Against the path below, H100, fp16, CUDA graphs, us (.dev/ab.py,
      // 2026-11-23 (p)): M=64 4096x4096 16.8 -> 15.7, 4096x14336 27.4 -> 26.2, 8192x8192 32.1 ->
      // 31.0, 8192x28672 85.6 -> 83.1, 14336x4096 29.5 -> 28.2; M=128 within 2%.
      const int lane = threadIdx.x & 31;
      const S* scales = static_cast<const S*>(p.scales);
      for (int step = 0; step < steps; ++step) {
        const int st = step % kStages;
        if (step >= kStages) mbar_wait(&empty[st], (step / kStages - 1) & 1);
        const int kb = k_begin + step * kChunkK;
        const int64_t gbase = static_cast<int64_t>(p.group_shift >= 0 ? kb >> p.group_shift : 0) * p.n;
        const int n = n0 + 4 * lane;  // a lane's 4 rows are all in range or none
        const bool ok = n < p.n;
        cp_async<8>(&cscale[st][4 * lane], ok ? scales + gbase + n : scales, ok);
        if constexpr (HAS_ZEROS) cp_async<4>(&czero[st][4 * lane], ok ? p.zeros + gbase + n : p.zeros, ok);
        cp_async_mbar_arrive(&full[st]);
      }
      asm volatile("cp.async.wait_all;" ::: "memory");  // (all landed already: the consumers waited for them)
    } else if (!async_consts && threadIdx.x >= 32 && threadIdx.x < 32 + 32 * kConstsWarps) {
      // Otherwise loaded and stored by the lanes, up to kStages - 1 steps before their use; warp
      // w (1..kConstsWarps) takes steps w - 1, w - 1 + kConstsWarps, ... Each step's loads are a
      // global round trip the warp waits for, so one warp delivers one step per memory latency:
      // at M <= 128 that bounded the kernel (~1.3 us per step). H100, fp16, CUDA graphs, us, 3
      // warps vs 1: M=64 8192x8192 33.0 vs 42.2, 8192x28672 83.6 vs 103.4, 4096x14336 26.8 vs
      // 35.8, 14336x4096 29.7 vs 38.0; M=128 8192x8192 41.9 vs 47.1; M=256 within 1% except
      // 8192x28672 179 vs 189; M=1024 (256 x rows) up to 4% slower, so those keep one
      // (.dev/cw_ab.py, 2026-11-23 (o)). (A parity wait cannot tell phase n from n - 2: each
      // warp's previous step must imply the release two phases back, as it does for these
      // warp counts and stage counts.)
      const int lane = threadIdx.x & 31;
      const S* scales = static_cast<const S*>(p.scales);
      for (int step = threadIdx.x / 32 - 1; step < steps; step += kConstsWarps) {
        const int st = step % kStages;
        if (step >= kStages) mbar_wait(&empty[st], (step / kStages - 1) & 1);
        const int kb = k_begin + step * kChunkK;
        const int64_t gbase = static_cast<int64_t>(p.group_shift >= 0 ? kb >> p.group_shift : 0) * p.n;
#pragma unroll
        for (int i = 0; i < kWgmmaBN / 32; ++i) {
          const int n = n0 + lane + 32 * i;
          const bool ok = n < p.n;
          cscale[st][lane + 32 * i] = ok ? scales[gbase + n] : S{};
          if constexpr (HAS_ZEROS) czero[st][lane + 32 * i] = ok ? p.zeros[gbase + n] : uint8_t{0};
        }
        mbar_arrive(&full[st]);  // release: the consumers' wait (acquire) sees the stores
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int ct = threadIdx.x - 128;  // consumer thread: warpgroup ct / 128, 64 weight rows each
  const int lane = ct & 31, warp = ct >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row_a = 16 * warp + g;  // and row_a + 8 (the same 64-byte swizzle phase)
  const int wsw = (row_a >> 1) & 3;

  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
  // The 8 slices of a step go in 2 batches of 4 (one commit group each), with one A register
  // set per batch: a batch's registers are rewritten only after its group retired.
  constexpr int G = 4;
  uint32_t a[2][G][4];
  const uint32_t sel = std::is_same_v<T, __half> ? t * 0x1111u : (t | t << 4 | (4 + t) << 8 | (4 + t) << 12);

  const uint32_t ring_lo = desc_lo(smem_u32(smem));  // descriptor of stage 0's first x slice
  for (int step = 0; step < steps; ++step) {
    const int st = step % kStages;
    mbar_wait(&full[st], (step / kStages) & 1);
    ByteDequant<T> da, db;
    da.init(scale_bits_as<T>(cscale[st][row_a]), HAS_ZEROS ? czero[st][row_a] : 8u);
    db.init(scale_bits_as<T>(cscale[st][row_a + 8]), HAS_ZEROS ? czero[st][row_a + 8] : 8u);
    const uint8_t* ws = smem + st * kStageBytes + 2 * kXSlab;
    const uint32_t stage_lo = ring_lo + st * (kStageBytes >> 4);
    uint4 wa, wb;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      uint32_t(&buf)[G][4] = a[b];
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const int s = b * G + j, u = s >> 1, h = s & 1;
        if (h == 0) {
          wa = *reinterpret_cast<const uint4*>(ws + row_a * 64 + 16 * (u ^ wsw));
          wb = *reinterpret_cast<const uint4*>(ws + (row_a + 8) * 64 + 16 * (u ^ wsw));
        }
        buf[j][0] = da(h ? wa.z : wa.x, sel);
        buf[j][1] = db(h ? wb.z : wb.x, sel);
        buf[j][2] = da(h ? wa.w : wa.y, sel);
        buf[j][3] = db(h ? wb.w : wb.y, sel);
      }
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const int s = b * G + j;
        wgmma_n<T, BM>(acc, buf[j], desc_k128(stage_lo + (((s >> 2) * kXSlab + (s & 3) * 32) >> 4)));
      }
      wgmma_commit();
      wgmma_wait<1>();
      // The group before this one has retired: at batch 0, the previous step's last, so its
      // stage goes back to the producers. (One arrival per warpgroup would do in practice,
      // its warps' reads precede their wgmmas, but compute-sanitizer's racecheck cannot see
      // that order: it reported the constants' stores against their reads.)
      if (b == 0 && step > 0) mbar_arrive(&empty[(step - 1) % kStages]);
    }
  }
  wgmma_wait<0>();
  fence_acc<BM / 2>(acc);

  if (p.part != nullptr) {  // fp32 split-K partials: one store per value
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = n0 + row_a + (i >= 2 ? 8 : 0);
        const int m = m0 + 8 * j + 2 * t + (i & 1);
        if (m < p.m && row < p.n) store_tile_result<T>(p, m, row, acc[4 * j + i]);
      }
    return;
  }
  // The y tile [BM x rows of x][128 weight rows] through shared memory (the ring is idle once
  // every consumer's wgmmas retired: the barrier below), then stored in coalesced 16-byte
  // pieces. stmatrix .trans writes each 8 x 8 block of the accumulator (8 weight rows x 8 x
  // rows) as 8 rows of y, 16 bytes each; rows kOutRow bytes apart (+16: the 8 rows of a phase
  // fall in 8 different bank groups). H100, fp16, CUDA graphs, us, against one 2-byte store
  // per value from the accumulator registers (4 rows x 16 bytes per warp store): 4096x14336
  // M = 256 / 1024 / 4096 56.6 / 212 / 761 -> 50.6 / 189 / 663; 4096x4096 M=1024 56.0 -> 50.8;
  // 8192x28672 M=256 198 -> 182; M <= 128 within 2% except 4096x14336 M=128 41.0 -> 38.3
  // (.dev/epi_ab.py, 2026-11-23 (o)).
  constexpr int kOutRow = kWgmmaBN * 2 + 16;
  named_barrier_sync(1, 256);
  float b0 = 0.f, b1 = 0.f;  // bias of this lane's rows row_a, row_a + 8 (added in fp32, as before)
  if (p.bias != nullptr) {
    if (n0 + row_a < p.n) b0 = load_bias<T>(p, n0 + row_a);
    if (n0 + row_a + 8 < p.n) b1 = load_bias<T>(p, n0 + row_a + 8);
  }
  {
    const int q = lane >> 3, c = lane & 7;  // this lane's address: row c of matrix q
    const uint32_t base = smem_u32(smem) + (8 * (q >> 1) + c) * kOutRow + (16 * warp + 8 * (q & 1)) * 2;
#pragma unroll
    for (int j = 0; j < BM / 8; j += 2)
      stmatrix_x4_trans(base + 8 * j * kOutRow, pack2<T>(acc[4 * j] + b0, acc[4 * j + 1] + b0),
                        pack2<T>(acc[4 * j + 2] + b1, acc[4 * j + 3] + b1),
                        pack2<T>(acc[4 * j + 4] + b0, acc[4 * j + 5] + b0),
                        pack2<T>(acc[4 * j + 6] + b1, acc[4 * j + 7] + b1));
  }
  named_barrier_sync(1, 256);
  T* out = static_cast<T*>(p.out);
  for (int e = ct; e < BM * 16; e += 256) {
    const int m = m0 + (e >> 4), n = n0 + 8 * (e & 15);
    if (m >= p.m || n >= p.n) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(smem + (e >> 4) * kOutRow + 16 * (e & 15));
    T* dst = out + static_cast<int64_t>(m) * p.n + n;
    if (n + 8 <= p.n && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {  // ragged N or unaligned rows: element by element
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint16_t bits = static_cast<uint16_t>(w[i >> 1] >> (16 * (i & 1)));
        if (n + i < p.n) dst[i] = *reinterpret_cast<const T*>(&bits);
      }
    }
  }
#else
  __trap();  // the host launches this kernel only on sm_90a code
#endif
}

// A 2-D tensor map (row-major, `row_bytes` apart) with boxes of box_inner x box_outer;
// out-of-range parts of a box read zeros.
CUtensorMap encode_map(const void* base, CUtensorMapDataType type, uint64_t inner, uint64_t outer, uint64_t row_bytes,
                       uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status));
    TORCH_CHECK(fn != nullptr && status == cudaDriverEntryPointSuccess,
                "int4_matmul (cuda): cuTensorMapEncodeTiled is not available from the driver");
    return reinterpret_cast<Encode>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(&map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "int4_matmul (cuda): cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return map;
}

template <typename T, typename S, bool HAS_ZEROS, int BM>
void launch_one(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  // Batches of 4 slices, 2 batches' A registers alive. H100, fp16, CUDA graphs, us, against
  // one slice per commit group with 4 groups in flight (which ptxas serialized, C7513: one
  // A register set reused, a wait for the tensor cores before each slice's dequantization):
  // 8192x8192 M = 128 / 1024 / 4096 47.1 / 217 / 817 -> 45.9 / 194 / 810; 4096x14336 M=4096
  // 840 -> 696; 8192x28672 M = 128 / 256 121.9 / 198 (was 140.9 / 216). Batches of 8 with
  // one alive (no ptxas serialization either): within 2% at M <= 256, +-10% at M >= 1024
  // (.dev/wg_ab.py, 2026-11-23 (o)).
  auto kernel = wgmma_kernel<T, S, HAS_ZEROS, BM>;
  static std::array<std::atomic<bool>, 64> prepared{};
  std::atomic<bool>* flag = device >= 0 && device < 64 ? &prepared[device] : nullptr;
  if (flag == nullptr || !flag->load(std::memory_order_acquire)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Ring<BM>::kSmem));
    if (flag != nullptr) flag->store(true, std::memory_order_release);
  }
  // TMA wants 16-byte aligned bases and row strides: the host's x copies and the packed
  // layout (K % 32 == 0) give them.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.x_stride % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(p.packed) % 16 == 0 && p.kw % 4 == 0,
              "int4_matmul (cuda): operands not aligned for the wgmma kernel's tensor maps");
  // x [M, K] 16-bit in boxes of 64 x BM rows; the packed weight [N, K / 8] int32 in boxes of
  // 16 words x 128 rows.
  const CUtensorMap xmap = encode_map(p.x, CU_TENSOR_MAP_DATA_TYPE_UINT16, p.k, p.m, p.x_stride * 2, 64, BM,
                                      CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap wmap = encode_map(p.packed, CU_TENSOR_MAP_DATA_TYPE_INT32, p.kw, p.n, p.kw * 4, 16, kWgmmaBN,
                                      CU_TENSOR_MAP_SWIZZLE_64B);
  const bool async_consts = p.n % 4 == 0 && reinterpret_cast<uintptr_t>(p.scales) % 8 == 0 &&
                            (p.zeros == nullptr || reinterpret_cast<uintptr_t>(p.zeros) % 4 == 0);
  const dim3 grid(plan.ctas_n, plan.ctas_m, plan.splits);
  kernel<<<grid, kThreads, Ring<BM>::kSmem, stream>>>(xmap, wmap, p, async_consts);
}

template <typename T, typename S, bool HAS_ZEROS>
void launch_bm(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  if (plan.config == 2)
    launch_one<T, S, HAS_ZEROS, 64>(p, plan, stream, device);
  else if (plan.config == 3)
    launch_one<T, S, HAS_ZEROS, 128>(p, plan, stream, device);
  else
    launch_one<T, S, HAS_ZEROS, 256>(p, plan, stream, device);
}

template <typename T, typename S>
void launch_scales(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  if (p.zeros != nullptr)
    launch_bm<T, S, true>(p, plan, stream, device);
  else
    launch_bm<T, S, false>(p, plan, stream, device);
}

}  // namespace

bool wgmma_supported(int device, int group_shift) {
#ifdef DEEPKERN_HAS_SM90A
  return cc_major(device) == 9 && (group_shift < 0 || group_shift >= 7);
#else
  (void)device, (void)group_shift;
  return false;
#endif
}

template <typename T>
void launch_wgmma(const Params& p, const TilePlan& plan, cudaStream_t stream, int device) {
  using Other = std::conditional_t<std::is_same_v<T, __half>, __nv_bfloat16, __half>;
  TORCH_CHECK(p.scale_kind == 0 || p.scale_kind == 1, "int4_matmul (cuda): the wgmma kernel takes 16-bit scales");
  TORCH_CHECK(p.x_stride < kWgmmaMaxStride, "int4_matmul (cuda): x row stride too large for the wgmma kernel");
  if (p.scale_kind == 0)
    launch_scales<T, T>(p, plan, stream, device);
  else
    launch_scales<T, Other>(p, plan, stream, device);
}

template void launch_wgmma<__half>(const Params&, const TilePlan&, cudaStream_t, int);
template void launch_wgmma<__nv_bfloat16>(const Params&, const TilePlan&, cudaStream_t, int);

}  // namespace int4mm
}  // namespace deepkern
