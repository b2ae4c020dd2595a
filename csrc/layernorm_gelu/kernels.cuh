// Device code of the fused LayerNorm/RMSNorm + GELU op (host side: layernorm_gelu.cu).
//
//   h = x + residual (optional, rounded to x's dtype and stored); y = GELU(norm(h) * w + b)
//
// Memory-bound, but with ~20 instructions of GELU per element the ALUs matter too, so the
// kernels aim for many resident warps and few instructions per element:
//   fwd_rows_kernel: rows of < 256 vectors: one row per `tpr` threads (one warp per row for
//     short rows), the row in registers as fp32 (1..4 16-byte vectors per thread), not
//     persistent. Measured on H100 (16384x8192 bf16): a persistent variant with next-row
//     prefetch, 16 warps/SM and ~100 registers ran at 35% of copy bandwidth.
//   fwd_split_kernel: longer rows, held as raw 16-byte vectors (4..8 per thread) and split
//     over a thread cluster of up to 8 CTAs on sm_90 (row sums through distributed shared
//     memory); with a residual, two rows per CTA.
//   bwd_rows_kernel: persistent row walkers (weight-gradient sums stay in registers across
//     rows), next row's loads issued before the current row is reduced.
//   fwd_loop / bwd_stats + bwd_tiles: rows too long for registers (or unaligned), two passes
//     over the row.
// dweight/dbias: every row walker writes fp32 column partials; sum_partials_kernel adds them in
// a fixed order, so the result has the same bits run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/mbarrier.cuh"
#include "common/vec.cuh"
#include "layernorm_gelu/ring.cuh"

namespace deepkern::lngelu {

constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Exact (erf) GELU through the normal CDF: Phi(-|z|) = t * Q(t) * exp(-z*z/2) with
// t = 1 / (1 + C|z|); C and Q fitted by scripts/fit_gelu_phi.py (it prints them and the errors).
// Degree 6 for 16-bit outputs (Phi within 6e-6 relative in fp32 arithmetic, 40x below half an
// fp16 ulp), degree 8 for fp32 (6e-7 for |z| <= 2, 3e-6 at z = -6). libdevice erff costs ~23
// instructions per element against 11 + degree here, and 0.5 * (1 + erf(z / sqrt 2)) cancels
// to nothing for z < -4, where this form keeps its relative accuracy. Same constants as the
// Triton kernels (triton_kernels/layernorm_gelu_common.py). Returns t * Q(t) = Phi(-|z|) / e;
// *e = exp(-z*z/2).
template <bool WIDE>
__device__ __forceinline__ float phi_tail_over_e(float z, float* e) {
  const float a = fabsf(z);
  *e = exp2_approx(z * (z * -0.7213475204444817f));
  float t, q;
  if constexpr (WIDE) {
    t = rcp_approx(fmaf(a, 2.828427125e-01f, 1.f));
    q = fmaf(t, 2.513013125e-02f, -9.144716956e-02f);
    q = fmaf(q, t, 8.453721063e-02f);
    q = fmaf(q, t, -2.799373214e-03f);
    q = fmaf(q, t, 7.071379143e-02f);
    q = fmaf(q, t, 8.427144193e-02f);
    q = fmaf(q, t, 1.039212977e-01f);
    q = fmaf(q, t, 1.128348014e-01f);
    q = fmaf(q, t, 1.128379309e-01f);
  } else {
    t = rcp_approx(fmaf(a, 3.889087297e-01f, 1.f));
    q = fmaf(t, 4.942435523e-02f, -1.509265762e-01f);
    q = fmaf(q, t, 8.859074239e-02f);
    q = fmaf(q, t, 6.930821865e-02f);
    q = fmaf(q, t, 1.333594549e-01f);
    q = fmaf(q, t, 1.550938513e-01f);
    q = fmaf(q, t, 1.551520857e-01f);
  }
  return q * t;
}

// Phi(-|z|); *e = exp(-z*z/2).
template <bool WIDE>
__device__ __forceinline__ float phi_tail(float z, float* e) {
  return phi_tail_over_e<WIDE>(z, e) * *e;
}

// The GELU variant is a template parameter of every kernel: as a runtime flag inside the
// unrolled element loops the compiler may predicate both forms for every element. T is the
// output dtype (fp32 takes the wider fit).
template <bool TANH, typename T>
__device__ __forceinline__ float gelu(float z) {
  if constexpr (TANH) {
    const float u = kSqrt2OverPi * (z + 0.044715f * z * z * z);
    return 0.5f * z * (1.f + tanhf(u));
  } else {
    // z * Phi(z) = max(z, 0) - |z| * Phi(-|z|): no select.
    float e;
    const float p = phi_tail<std::is_same_v<T, float>>(z, &e);
    return fmaxf(z, 0.f) - fabsf(z) * p;
  }
}

template <bool TANH, typename T>
__device__ __forceinline__ float gelu_grad(float z) {
  if constexpr (TANH) {
    const float z2 = z * z;
    const float t = tanhf(kSqrt2OverPi * z * (1.f + 0.044715f * z2));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 0.134145f * z2);
  } else {
    // Phi(z) + z * phi(z) with p = Phi(-|z|) = e * tq and phi(z) = e / sqrt(2 pi):
    // z >= 0: 1 - e * (tq - |z| / sqrt(2 pi)); z < 0: e * (tq - |z| / sqrt(2 pi)).
    // One FFMA for the bracket, one for the result: 16 instructions per element in SASS
    // against 20 for (z > 0 ? 1 - p : p) + z * phi(z). (Both cancel near z = -0.75, where
    // the derivative crosses zero.)
    float e;
    const float r = fmaf(-kInvSqrt2Pi, fabsf(z), phi_tail_over_e<std::is_same_v<T, float>>(z, &e));
    const bool pos = z >= 0.f;
    return fmaf(e, pos ? -r : r, pos ? 1.f : 0.f);
  }
}

struct FwdParams {
  const void* x;
  int64_t x_stride;
  const void* res;  // nullptr: no residual
  int64_t res_stride;
  const void* w;  // nullptr: weight 1
  const void* b;  // nullptr: bias 0
  bool params_fp32;  // weight/bias are fp32 (else x's dtype); the rows kernels take it as PT
  void* y;  // [rows, n] contiguous
  void* h;  // [rows, n] contiguous, when res
  float* mean;
  float* rstd;
  int64_t rows;
  int n;
  float eps;
  bool rms;
};

struct BwdParams {
  const void* dy;
  int64_t dy_stride;
  const void* x;
  int64_t x_stride;
  const void* w;
  const void* b;
  bool params_fp32;
  const float* mean;
  const float* rstd;
  void* dx;  // [rows, n] contiguous
  float* dw_part;  // [slots, n] when w
  float* db_part;  // [slots, n] when b
  float* row_c1;  // [rows] mean(dxhat) (stats+tiles path)
  float* row_c2;  // [rows] mean(dxhat * xhat)
  int64_t rows;
  int n;
  bool rms;
};

// (count, mean, M2) of a set of values; merged with Chan's formula.
struct Moments {
  float count, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float count = a.count + b.count;
  if (count == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float frac = b.count / count;
  return {count, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.count * frac};
}

// weight and bias of VEC columns as fp32 (1 and 0 when absent).
template <typename PT, int VEC>
__device__ __forceinline__ void load_wb(const void* w, const void* b, int col, float (&wv)[VEC],
                                        float (&bv)[VEC]) {
  if (w) {
    load_float<PT, VEC>(static_cast<const PT*>(w) + col, wv);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) wv[j] = 1.f;
  }
  if (b) {
    load_float<PT, VEC>(static_cast<const PT*>(b) + col, bv);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) bv[j] = 0.f;
  }
}

// Weight and bias of VEC columns as raw packs (1 and 0 when absent).
template <typename PT, int VEC>
__device__ __forceinline__ void load_wb_packs(const void* w, const void* b, int col,
                                              Pack<PT, VEC>& pw, Pack<PT, VEC>& pb) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) pw.v[j] = from_float<PT>(1.f), pb.v[j] = from_float<PT>(0.f);
  if (w) pw = *reinterpret_cast<const Pack<PT, VEC>*>(static_cast<const PT*>(w) + col);
  if (b) pb = *reinterpret_cast<const Pack<PT, VEC>*>(static_cast<const PT*>(b) + col);
}

// One pack, evict-first; zeros when !ok so converted values need no select.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> fetch_pack(const void* base, int64_t row, int64_t stride,
                                                   int vi, bool ok) {
  if (ok) return ldcs_pack<T, VEC>(static_cast<const T*>(base) + row * stride + vi * VEC);
  Pack<T, VEC> zero;
#pragma unroll
  for (int j = 0; j < VEC; ++j) zero.v[j] = from_float<T>(0.f);
  return zero;
}

// ---------------------------------------------------------------------------------------
// Forward, row in registers: threads [g * tpr, (g + 1) * tpr) of a CTA serve row g of the
// CTA's blockDim / tpr rows; thread t holds vectors t, t + tpr, ... (coalesced for each i).
template <typename T, typename PT, int VEC, int ITERS, bool TANH>
__global__ void __launch_bounds__(ITERS >= 8 ? 256 : 1024) fwd_rows_kernel(FwdParams p, int tpr) {
  __shared__ float scratch[2][32];
  const int group = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + group;
  const bool active = row < p.rows;
  const int n = p.n, nvec = n / VEC, warps = tpr / 32;

  // Every load of a phase is issued before any store: a store in between (h, y) may alias the
  // next load as far as the compiler knows, which serializes the loads' latencies.
  float v[ITERS][VEC];
  {
    Pack<T, VEC> px[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      px[i] = fetch_pack<T, VEC>(p.x, row, p.x_stride, i * tpr + t, active && i * tpr + t < nvec);
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = to_float(px[i].v[j]);
  }
  if (p.res) {
    Pack<T, VEC> pr[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
      pr[i] = fetch_pack<T, VEC>(p.res, row, p.res_stride, i * tpr + t, active && i * tpr + t < nvec);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int vi = i * tpr + t;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = to_float(from_float<T>(v[i][j] + to_float(pr[i].v[j])));
      if (active && vi < nvec) store_float<T, VEC>(static_cast<T*>(p.h) + row * n + vi * VEC, v[i]);
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += v[i][j];
  // Exact two-pass statistics (rmsnorm: centered on 0).
  const float mean = p.rms ? 0.f : group_sum(sum, warps, scratch[0]) / n;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (i * tpr + t >= nvec) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss = fmaf(v[i][j] - mean, v[i][j] - mean, ss);
  }
  const float rstd = rsqrtf(group_sum(ss, warps, scratch[1]) / n + p.eps);
  if (!active) return;  // no barriers below
  if (t == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
  // (v - mean) * rstd, not fma(v, rstd, -mean * rstd): the latter loses digits when
  // |mean| >> std.
  // Outputs overwrite v in place (all weight/bias loads ahead of the stores), then are stored.
  // (Loading every weight/bias pack first, then converting, spilled 740 bytes at 64 registers.)
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    float w[VEC], b[VEC];
    load_wb<PT, VEC>(p.w, p.b, min(i * tpr + t, nvec - 1) * VEC, w, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[i][j] = gelu<TANH, T>(fmaf((v[i][j] - mean) * rstd, w[j], b[j]));
  }
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int vi = i * tpr + t;
    if (vi < nvec) store_float<T, VEC>(static_cast<T*>(p.y) + row * n + vi * VEC, v[i]);
  }
}

// Makes the compiler treat 16 bytes as a new value (no instruction): conversions after it
// cannot be merged with conversions before it, so fp32 copies of a held row are not kept
// alive across phases.
__device__ __forceinline__ void opaque(uint4& u) {
  asm volatile("" : "+r"(u.x), "+r"(u.y), "+r"(u.z), "+r"(u.w));
}

// 16 bytes through the read-only path as a volatile asm: it keeps its place among the other
// volatile asm (opaque), so the compiler cannot hoist the weight loads of every vector of a
// row ahead of the first (registers).
__device__ __forceinline__ uint4 ldg_ordered(const void* ptr) {
  uint4 u;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
               : "l"(ptr));
  return u;
}

// Element j of a 16-byte pack of T (8 16-bit values or 4 floats), as fp32: a shift or a mask
// for bf16 (going through __nv_bfloat16 adds a PRMT per high half).
template <typename T>
__device__ __forceinline__ float widen(const uint4& u, int j) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(j == 0 ? u.x : j == 1 ? u.y : j == 2 ? u.z : u.w);
  } else {
    const uint32_t w = j < 2 ? u.x : j < 4 ? u.y : j < 6 ? u.z : u.w;
    const uint16_t h = static_cast<uint16_t>(j % 2 ? w >> 16 : w & 0xffffu);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(static_cast<uint32_t>(h) << 16);
    } else {
      return __half2float(__ushort_as_half(h));
    }
  }
}

template <typename PT, int VEC>
__device__ __forceinline__ void load_param_ordered(const void* base, int col, float (&out)[VEC]) {
  constexpr int kPer = 16 / sizeof(PT), kWords = VEC / kPer;  // values per 16 bytes, words
  static_assert(VEC % kPer == 0, "whole 16-byte vectors");
  uint4 raw[kWords];
#pragma unroll
  for (int k = 0; k < kWords; ++k) raw[k] = ldg_ordered(static_cast<const PT*>(base) + col + k * kPer);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = widen<PT>(raw[j / kPer], j % kPer);
}

__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ float2 add(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }

// Row totals of a per-CTA value (float, or float2: two rows) over the `ctas` CTAs of a thread
// cluster (sm_90+) without cluster barriers: each CTA pushes its value into a slot of every
// CTA (st.async into distributed shared memory, the bytes counted on the receiver's
// mbarrier) and waits on its own mbarrier (an acquire at CTA scope), then every thread adds
// the slots in rank order (the same bits in every CTA). One cluster barrier per CTA, after
// the mbarriers are initialized; none at exit: a CTA finishes only after every push to it
// landed, so no push can target an exited CTA. Every barrier.cluster.wait is followed by an
// L1 invalidation (CCTL.IVALL in sm_90a SASS), and with barriers (a publish and a wait per
// row sum, one more before exit) the weight/bias re-reads of long rows missed L1 (ncu,
// 4096x65536 bf16: 11% hit rate). H100 bf16, one row per CTA, barriers vs this, us, the same
// bits: 4096x65536 481 / 463, 8192x32768 463 / 436, 16384x20480 562 / 538, 2048x131072 510 /
// 492; two rows per CTA (residual) within 0.5% either way (4096x65536 830 / 826).
template <typename V>
struct ClusterSums {
  uint64_t bar[2];             // one per use (sums, centered squares), each completes once
  V slot[2][kMaxClusterRing];  // by use, by source rank
};

template <typename V>
__device__ __forceinline__ void cluster_sums_init(ClusterSums<V>& x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) {
    mbar_init(&x.bar[0], 1);
    mbar_init(&x.bar[1], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();  // the host launches clusters only on sm_90+
#endif
}

// Use q (0 or 1) of `x`: the total of v over the cluster's `ctas` CTAs; `rank` is this CTA's.
template <typename V>
__device__ __forceinline__ V cluster_total(V v, ClusterSums<V>& x, int q, int ctas, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) mbar_expect_tx(&x.bar[q], static_cast<uint32_t>(ctas * sizeof(V)));
  if (static_cast<int>(threadIdx.x) < ctas) {  // thread r pushes to CTA r
    uint32_t rslot, rbar;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rslot) : "r"(smem_u32(&x.slot[q][rank])), "r"(threadIdx.x));
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rbar) : "r"(smem_u32(&x.bar[q])), "r"(threadIdx.x));
    if constexpr (std::is_same_v<V, float>) {
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];" ::"r"(rslot), "f"(v), "r"(rbar)
                   : "memory");
    } else {
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(rslot),
                   "f"(v.x), "f"(v.y), "r"(rbar)
                   : "memory");
    }
  }
  mbar_wait(&x.bar[q], 0);
  V total = x.slot[q][0];
  for (int r = 1; r < ctas; ++r) total = add(total, x.slot[q][r]);
  return total;
#else
  __trap();
  return v;
#endif
}

// CTA total of ROWS per-thread values (one per row): group_sum, or group_sum2 for two rows.
template <int ROWS>
__device__ __forceinline__ auto cta_total(const float (&v)[ROWS], int warps, float (*scratch)[32], int which) {
  if constexpr (ROWS == 1) {
    return group_sum(v[0], warps, scratch[which]);
  } else {
    return group_sum2(make_float2(v[0], v[1]), warps, scratch);
  }
}

__device__ __forceinline__ float component(float v, int) { return v; }
__device__ __forceinline__ float component(float2 v, int r) { return r == 0 ? v.x : v.y; }

// ---------------------------------------------------------------------------------------
// Forward, rows too long for fwd_rows_kernel: the row split over `ctas` CTAs (a thread
// cluster on sm_90; ctas = 1 elsewhere), each holding its part in registers as raw 16-byte
// vectors (4 registers per 8 16-bit values) that are widened again in each phase, so x is
// read from memory once (fwd_loop_kernel reads it twice). Row statistics: a CTA sum, then a
// cluster sum through distributed shared memory.
// H100, 4096x65536 bf16: fwd_loop_kernel 779 us; one CTA of 512 threads per row (ITERS = 16)
// 613 us (one row fills half the register file, so an SM alternates between loading a row and
// computing it); a cluster of four CTAs of 256 threads 511 us (quarter rows of different rows
// overlap on each SM). As the single CTA of shorter rows (ITERS = 8, <= 256 threads) it beats
// fwd_rows_kernel from 256 vectors on (see launch_fwd).
// ROWS = 2 (rows over a cluster, with a residual; see launch_fwd_split): a CTA serves the same
// columns of two adjacent rows (ITERS vectors of each per thread, a cluster twice as large):
// weight and bias are read and widened once per two rows, both rows' sums share each
// reduction and cluster exchange, and x and the residual of a row take half the registers
// (13-15% faster with a residual). Without one it is no faster, though at 65536 columns the
// one-row kernel re-reads its part of weight and bias from L2 for every row (ncu, 4096x65536
// bf16: L1 hit rate 11%, 1.07 GB of L2 reads for 0.54 GB of x; the kernel without weight and
// bias 428 us against 477): L2 traffic is not what limits that shape.
// MIN_CTAS: CTAs per SM in the launch bounds (0: 4, or 1 past 8 vectors per thread and row;
// see launch_fwd_split for where 3 is faster).
// Instructions (ncu, 16384x8192 bf16): 39 per element before the copies of the normalize phase
// without per-vector branches and per-element defaults and the lane-parallel block sums, 33
// after (211 vs 254 us under ncu; Triton's forward 31).
template <typename T, typename PT, int ITERS, int ROWS, bool TANH, int MIN_CTAS = 0>
__global__ void __launch_bounds__(ITERS * ROWS > 8 ? 512 : 256, MIN_CTAS ? MIN_CTAS : (ITERS * ROWS > 8 ? 1 : 4))
    fwd_split_kernel(FwdParams p, int ctas, int iters) {
  static_assert(ROWS == 1 || ROWS == 2, "one or two rows per CTA");
  constexpr int VEC = 16 / sizeof(T);
  using V = std::conditional_t<ROWS == 1, float, float2>;
  __shared__ float scratch[2][32];
  __shared__ ClusterSums<V> sums;  // the cluster's row sums (ctas > 1)
  const int t = threadIdx.x, warps = blockDim.x / 32;
  const int64_t row0 = blockIdx.x / ctas * ROWS;
  const int n = p.n, nvec = n / VEC;
  // Threads [0, tpr) hold vectors t, t + tpr, ..., `iters` (<= ITERS, chosen by the host so
  // that tpr fills whole warps where it can) of this CTA's part; the CTA's last warp may have
  // threads without any.
  const int tpr = ((nvec + ctas - 1) / ctas + iters - 1) / iters;
  const int base = (blockIdx.x % ctas) * iters * tpr;  // first vector of this CTA's part
  auto inside = [&](int i) { return i < iters && t < tpr && base + i * tpr + t < nvec; };
  // Rows past the end (the second of an odd last pair): read as zeros, never written.
  auto row_ok = [&](int r) { return ROWS == 1 || row0 + r < p.rows; };
  // This thread's vectors of the rows of x or the residual (zeros past them), evict-first.
  auto fetch = [&](const void* src, int64_t stride, uint4 (&out)[ROWS][ITERS]) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint4* rp = reinterpret_cast<const uint4*>(static_cast<const T*>(src) + (row0 + r) * stride);
#pragma unroll
      for (int i = 0; i < ITERS; ++i)
        out[r][i] = inside(i) && row_ok(r) ? __ldcs(rp + base + i * tpr + t) : make_uint4(0, 0, 0, 0);
    }
  };

  uint4 px[ROWS][ITERS];
  fetch(p.x, p.x_stride, px);
  if (ctas > 1) cluster_sums_init(sums);
  auto total_of = [&](V v, int q) {
    return ctas > 1 ? cluster_total(v, sums, q, ctas, static_cast<int>(blockIdx.x % ctas)) : v;
  };
  if (p.res) {
    uint4 pr[ROWS][ITERS];
    fetch(p.res, p.res_stride, pr);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int vi = base + i * tpr + t;
        Pack<T, VEC> h;
#pragma unroll
        for (int j = 0; j < VEC; ++j) h.v[j] = from_float<T>(widen<T>(px[r][i], j) + widen<T>(pr[r][i], j));
        px[r][i] = *reinterpret_cast<const uint4*>(&h);
        if (inside(i) && row_ok(r)) reinterpret_cast<uint4*>(static_cast<T*>(p.h) + (row0 + r) * n)[vi] = px[r][i];
      }
  }
  float mean[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) mean[r] = 0.f;
  if (!p.rms) {
    float sum[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sum[r] = 0.f;
#pragma unroll
      for (int i = 0; i < ITERS; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[r] += widen<T>(px[r][i], j);
    }
    const V total = total_of(cta_total<ROWS>(sum, warps, scratch, 0), 0);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) mean[r] = component(total, r) / n;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int i = 0; i < ITERS; ++i) opaque(px[r][i]);
  }
  // A thread whose vectors all lie inside the row (every thread where the row fills its CTAs)
  // runs the loops below without a branch per vector (~3 SASS instructions each).
  const bool full = inside(iters - 1);
  auto centered_squares = [&](auto all_inside, float (&ss)[ROWS]) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      ss[r] = 0.f;
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        if (decltype(all_inside)::value ? i >= iters : !inside(i)) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = widen<T>(px[r][i], j) - mean[r];
          ss[r] = fmaf(d, d, ss[r]);
        }
      }
    }
  };
  float ss[ROWS];
  if (full)
    centered_squares(std::true_type{}, ss);
  else
    centered_squares(std::false_type{}, ss);
  const V ss_total = total_of(cta_total<ROWS>(ss, warps, scratch, 1), 1);
  float rstd[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rstd[r] = rsqrtf(component(ss_total, r) / n + p.eps);
  if (t == 0 && base == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (!row_ok(r)) continue;
      p.mean[row0 + r] = mean[r];
      p.rstd[row0 + r] = rstd[r];
    }
  }
  // Three copies of this phase. With weight and bias (the common case) no per-element defaults
  // are selected (predicated MOVs in SASS, issued even where the branch is not taken); with
  // every vector inside the row, no branch per vector.
  auto affine_gelu = [&](auto with_wb, auto all_inside) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int vi = base + i * tpr + t;
      if (decltype(all_inside)::value ? i >= iters : !inside(i)) continue;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) opaque(px[r][i]);
      float w[VEC], b[VEC];
      if constexpr (decltype(with_wb)::value) {
        load_param_ordered<PT, VEC>(p.w, vi * VEC, w);
        load_param_ordered<PT, VEC>(p.b, vi * VEC, b);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) w[j] = 1.f, b[j] = 0.f;
        if (p.w) load_param_ordered<PT, VEC>(p.w, vi * VEC, w);
        if (p.b) load_param_ordered<PT, VEC>(p.b, vi * VEC, b);
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (!row_ok(r)) continue;
        float y[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          y[j] = gelu<TANH, T>(fmaf((widen<T>(px[r][i], j) - mean[r]) * rstd[r], w[j], b[j]));
        store_float<T, VEC>(static_cast<T*>(p.y) + (row0 + r) * n + vi * VEC, y);
      }
    }
  };
  if (p.w && p.b && full) {
    affine_gelu(std::true_type{}, std::true_type{});
  } else if (p.w && p.b) {
    affine_gelu(std::true_type{}, std::false_type{});
  } else {
    affine_gelu(std::false_type{}, std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------
// Fallback forward for long rows: one row per CTA. Pass 1 keeps per-thread Moments (exact
// two-pass inside each vector, Chan merge across vectors and threads); pass 2 re-reads the row
// (h when a residual was added; mostly L2 hits) and writes y.
template <typename T, int VEC, bool TANH>
__global__ void __launch_bounds__(1024) fwd_loop_kernel(FwdParams p) {
  __shared__ Moments scratch[32];
  // One CTA per row. (Persistent CTAs, two per SM so that pass 2 re-reads from L2, measured
  // slower: 4096x65536 bf16 889 us vs 787 us.)
  const int64_t row = blockIdx.x;
  const int n = p.n, nvec = n / VEC;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  T* h = p.res ? static_cast<T*>(p.h) + row * n : nullptr;

  Moments m{0.f, 0.f, 0.f};
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float v[VEC];
    load_float<T, VEC>(x + c * VEC, v);
    if (p.res) {
      float r[VEC];
      load_float<T, VEC>(static_cast<const T*>(p.res) + row * p.res_stride + c * VEC, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(v[j] + r[j]));
      store_float<T, VEC>(h + c * VEC, v);
    }
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += p.rms ? v[j] * v[j] : v[j];
    if (p.rms) {
      m.count += VEC, m.m2 += s;  // mean stays 0, so merge() just adds the sums of squares
    } else {
      const float vm = s / VEC;
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += (v[j] - vm) * (v[j] - vm);
      m = merge(m, Moments{float(VEC), vm, ss});
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Moments o{__shfl_xor_sync(0xffffffffu, m.count, offset),
                    __shfl_xor_sync(0xffffffffu, m.mean, offset),
                    __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, o);
  }
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
  __syncthreads();
  Moments total{0.f, 0.f, 0.f};
  for (int i = 0; i < (blockDim.x + 31) / 32; ++i) total = merge(total, scratch[i]);
  const float mean = p.rms ? 0.f : total.mean;
  const float rstd = rsqrtf(total.m2 / n + p.eps);
  if (threadIdx.x == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  const T* src = p.res ? h : x;
  T* y = static_cast<T*>(p.y) + row * n;
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    const int col = c * VEC;
    float v[VEC], w[VEC], b[VEC], out[VEC];
    load_float<T, VEC>(src + col, v);
    if (p.w) load_param<T, VEC>(p.w, p.params_fp32, col, w);
    if (p.b) load_param<T, VEC>(p.b, p.params_fp32, col, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float z = (v[j] - mean) * rstd;
      if (p.w) z *= w[j];
      if (p.b) z += b[j];
      out[j] = gelu<TANH, T>(z);
    }
    store_float<T, VEC>(y + col, out);
  }
}

}  // namespace deepkern::lngelu
