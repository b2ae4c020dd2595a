// Device code of the fused LayerNorm/RMSNorm + GELU op (host side: layernorm_gelu.cu).
//
//   h = x + residual (optional, rounded to x's dtype and stored); y = GELU(norm(h) * w + b)
//
// Memory-bound with a heavy epilogue (erf per element), so the kernels keep both the memory
// pipe and the ALUs busy:
//   *_rows_kernel: persistent; a row lives in registers, spread over `tpr` threads of a CTA
//     (several rows per CTA for short rows) or over the CTAs of a cluster (long rows, sm_90).
//     While a row is reduced and written, the next row's loads are already in flight (the raw
//     16-byte packs are reloaded as soon as they are converted).
//   *_loop / bwd_stats+bwd_tiles: fallback for rows too long for the register paths (or
//     pre-sm_90 GPUs without clusters): two passes over the row.
// dweight/dbias: every row walker writes fp32 column partials; sum_partials_kernel adds them in
// a fixed order, so the result has the same bits run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/cluster.cuh"
#include "common/vec.cuh"

namespace deepkern::lngelu {

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

__device__ __forceinline__ float gelu(float z, bool tanh_approx) {
  if (tanh_approx) {
    const float u = kSqrt2OverPi * (z + 0.044715f * z * z * z);
    return 0.5f * z * (1.f + tanhf(u));
  }
  return 0.5f * z * (1.f + erff(z * kSqrt1_2));
}

__device__ __forceinline__ float gelu_grad(float z, bool tanh_approx) {
  if (tanh_approx) {
    const float z2 = z * z;
    const float t = tanhf(kSqrt2OverPi * z * (1.f + 0.044715f * z2));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 0.134145f * z2);
  }
  return 0.5f * (1.f + erff(z * kSqrt1_2)) + z * kInvSqrt2Pi * __expf(-0.5f * z * z);
}

struct FwdParams {
  const void* x;
  int64_t x_stride;
  const void* res;  // nullptr: no residual
  int64_t res_stride;
  const void* w;  // nullptr: weight 1
  const void* b;  // nullptr: bias 0
  bool params_fp32;  // weight/bias are fp32 (else x's dtype)
  void* y;  // [rows, n] contiguous
  void* h;  // [rows, n] contiguous, when res
  float* mean;
  float* rstd;
  int64_t rows;
  int n;
  float eps;
  bool rms;
  bool tanh;
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
  bool tanh;
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

// Which vectors of a row a thread owns, and which rows its CTA walks.
// CLUSTER == 1: threads [g*tpr, (g+1)*tpr) of a CTA serve row group g (blockDim/tpr groups).
// CLUSTER > 1: one row per cluster; CTA `rank` holds vector slices rank, rank + CLUSTER, ...
// Either way vector i of a thread is (i * CLUSTER + rank) * tpr + t: coalesced for every i.
template <int CLUSTER>
struct RowWalker {
  int tpr, t, group, rank;
  int64_t first, stride;  // rows first, first + stride, ... (same count for a whole CTA)
  int64_t slot;  // index of this walker's weight-gradient partial row

  __device__ explicit RowWalker(int tpr_) : tpr(tpr_) {
    t = threadIdx.x % tpr;
    group = threadIdx.x / tpr;
    if constexpr (CLUSTER > 1) {
      rank = blockIdx.x % CLUSTER;
      first = blockIdx.x / CLUSTER;
      stride = gridDim.x / CLUSTER;
      slot = first;
    } else {
      const int rows_per_cta = blockDim.x / tpr;
      rank = 0;
      first = static_cast<int64_t>(blockIdx.x) * rows_per_cta;
      stride = static_cast<int64_t>(gridDim.x) * rows_per_cta;
      slot = first + group;
    }
  }
  __device__ int vec(int i) const { return (i * CLUSTER + rank) * tpr + t; }
  __device__ int64_t row(int64_t base) const { return CLUSTER > 1 ? base : base + group; }
};

// ---------------------------------------------------------------------------------------
// Forward, rows in registers.
template <typename T, int VEC, int ITERS, int CLUSTER>
__global__ void __launch_bounds__(512) fwd_rows_kernel(FwdParams p, int tpr) {
  __shared__ float scratch[2][32];
  __shared__ Moments xchg[2], bcast;
  using P = Pack<T, VEC>;
  const RowWalker<CLUSTER> rw(tpr);
  const int n = p.n, nvec = n / VEC, warps = tpr / 32;
  int parity = 0;

  P rx[ITERS], rr[ITERS];
  auto fetch = [&](int64_t row) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int v = rw.vec(i);
      if (row < p.rows && v < nvec) {
        rx[i] = ldcs_pack<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + v * VEC);
        if (p.res) rr[i] = ldcs_pack<T, VEC>(static_cast<const T*>(p.res) + row * p.res_stride + v * VEC);
      }
    }
  };
  fetch(rw.row(rw.first));

  for (int64_t base = rw.first; base < p.rows; base += rw.stride) {
    const int64_t row = rw.row(base);
    const bool active = row < p.rows;
    float v[ITERS][VEC];
    float sum = 0.f, count = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const bool ok = active && rw.vec(i) < nvec;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = ok ? to_float(rx[i].v[j]) : 0.f;
      if (ok && p.res) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = to_float(from_float<T>(v[i][j] + to_float(rr[i].v[j])));
        store_float<T, VEC>(static_cast<T*>(p.h) + row * n + rw.vec(i) * VEC, v[i]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[i][j];
      count += ok ? VEC : 0;
    }
    fetch(rw.row(base + rw.stride));  // next row's loads fly while this one is reduced

    // Statistics: exact two-pass inside the CTA, Chan merge across a cluster.
    float mean = 0.f, m2 = 0.f;
    if (p.rms) {
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < ITERS; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += v[i][j] * v[i][j];
      m2 = group_sum(ss, warps, scratch[0]);
      if constexpr (CLUSTER > 1)
        m2 = cluster_allreduce<CLUSTER>(Moments{0.f, 0.f, m2}, xchg, &bcast, parity,
                                        [](Moments a, Moments b) { return Moments{0.f, 0.f, a.m2 + b.m2}; })
                 .m2;
    } else {
      const float2 sc = group_sum2(make_float2(sum, count), warps, scratch);
      const float local_count = CLUSTER > 1 ? sc.y : static_cast<float>(n);
      mean = local_count > 0.f ? sc.x / local_count : 0.f;
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        if (!(active && rw.vec(i) < nvec)) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += (v[i][j] - mean) * (v[i][j] - mean);
      }
      m2 = group_sum(ss, warps, scratch[0]);
      if constexpr (CLUSTER > 1) {
        const Moments all = cluster_allreduce<CLUSTER>(Moments{local_count, mean, m2}, xchg, &bcast,
                                                       parity, merge);
        mean = all.mean;
        m2 = all.m2;
      }
    }
    const float rstd = rsqrtf(m2 / n + p.eps);
    if (active && rw.t == 0 && rw.rank == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int vi = rw.vec(i);
      if (!(active && vi < nvec)) continue;
      float w[VEC], b[VEC], out[VEC];
      if (p.w) load_param<T, VEC>(p.w, p.params_fp32, vi * VEC, w);
      if (p.b) load_param<T, VEC>(p.b, p.params_fp32, vi * VEC, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float z = (v[i][j] - mean) * rstd;
        if (p.w) z *= w[j];
        if (p.b) z += b[j];
        out[j] = gelu(z, p.tanh);
      }
      store_float<T, VEC>(static_cast<T*>(p.y) + row * n + vi * VEC, out);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, rows in registers. Each walker keeps its columns' dweight/dbias sums in registers
// over all the rows it visits and writes them to partial row `slot` at the end.
template <typename T, int VEC, int ITERS, int CLUSTER>
__global__ void __launch_bounds__(512) bwd_rows_kernel(BwdParams p, int tpr) {
  __shared__ float scratch[2][32];
  __shared__ float2 xchg[2], bcast;
  using P = Pack<T, VEC>;
  const RowWalker<CLUSTER> rw(tpr);
  const int n = p.n, nvec = n / VEC, warps = tpr / 32;
  int parity = 0;

  float dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i][j] = db[i][j] = 0.f;

  P rx[ITERS], rdy[ITERS];
  auto fetch = [&](int64_t row) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int v = rw.vec(i);
      if (row < p.rows && v < nvec) {
        rx[i] = ldcs_pack<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + v * VEC);
        rdy[i] = ldcs_pack<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + v * VEC);
      }
    }
  };
  fetch(rw.row(rw.first));

  for (int64_t base = rw.first; base < p.rows; base += rw.stride) {
    const int64_t row = rw.row(base);
    const bool active = row < p.rows;
    const float mean = active ? p.mean[row] : 0.f;
    const float rstd = active ? p.rstd[row] : 0.f;
    float xh[ITERS][VEC], g[ITERS][VEC];  // xhat, dxhat
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int vi = rw.vec(i);
      const bool ok = active && vi < nvec;
      float w[VEC] = {}, b[VEC] = {};  // zeros past the row's end keep dxhat finite
      if (ok && p.w) load_param<T, VEC>(p.w, p.params_fp32, vi * VEC, w);
      if (ok && p.b) load_param<T, VEC>(p.b, p.params_fp32, vi * VEC, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = ok ? (to_float(rx[i].v[j]) - mean) * rstd : 0.f;
        float z = xhat;
        if (p.w) z *= w[j];
        if (p.b) z += b[j];
        const float dz = ok ? to_float(rdy[i].v[j]) * gelu_grad(z, p.tanh) : 0.f;
        dw[i][j] += dz * xhat;
        db[i][j] += dz;
        const float dxhat = p.w ? dz * w[j] : dz;
        xh[i][j] = xhat;
        g[i][j] = dxhat;
        c1 += dxhat;
        c2 += dxhat * xhat;
      }
    }
    fetch(rw.row(base + rw.stride));

    float2 c = group_sum2(make_float2(c1, c2), warps, scratch);
    if constexpr (CLUSTER > 1)
      c = cluster_allreduce<CLUSTER>(c, xchg, &bcast, parity,
                                     [](float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); });
    const float m1 = p.rms ? 0.f : c.x / n, m2 = c.y / n;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int vi = rw.vec(i);
      if (!(active && vi < nvec)) continue;
      float dx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dx[j] = rstd * (g[i][j] - m1 - xh[i][j] * m2);
      store_float<T, VEC>(static_cast<T*>(p.dx) + row * n + vi * VEC, dx);
    }
  }

#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int vi = rw.vec(i);
    if (vi >= nvec) continue;
    const int64_t at = rw.slot * n + vi * VEC;
    if (p.dw_part) store_float<float, VEC>(p.dw_part + at, dw[i]);
    if (p.db_part) store_float<float, VEC>(p.db_part + at, db[i]);
  }
}

// ---------------------------------------------------------------------------------------
// Fallback forward for long rows: one row per CTA. Pass 1 keeps per-thread Moments (exact
// two-pass inside each vector, Chan merge across vectors and threads); pass 2 re-reads the row
// (h when a residual was added; mostly L2 hits) and writes y.
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) fwd_loop_kernel(FwdParams p) {
  __shared__ Moments scratch[32];
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
      out[j] = gelu(z, p.tanh);
    }
    store_float<T, VEC>(y + col, out);
  }
}

// Fallback backward for long rows, step 1: per-row c1 = mean(dxhat), c2 = mean(dxhat * xhat).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) bwd_stats_kernel(BwdParams p) {
  __shared__ float scratch[2][32];
  const int64_t row = blockIdx.x;
  const int n = p.n;
  const float mean = p.mean[row], rstd = p.rstd[row];
  float c1 = 0.f, c2 = 0.f;
  for (int c = threadIdx.x; c < n / VEC; c += blockDim.x) {
    const int col = c * VEC;
    float x[VEC], dy[VEC], w[VEC], b[VEC];
    load_float<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, x);
    load_float<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + col, dy);
    if (p.w) load_param<T, VEC>(p.w, p.params_fp32, col, w);
    if (p.b) load_param<T, VEC>(p.b, p.params_fp32, col, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xhat = (x[j] - mean) * rstd;
      float z = xhat;
      if (p.w) z *= w[j];
      if (p.b) z += b[j];
      float dxhat = dy[j] * gelu_grad(z, p.tanh);
      if (p.w) dxhat *= w[j];
      c1 += dxhat;
      c2 += dxhat * xhat;
    }
  }
  const float2 c = group_sum2(make_float2(c1, c2), (blockDim.x + 31) / 32, scratch);
  if (threadIdx.x == 0) {
    p.row_c1[row] = p.rms ? 0.f : c.x / n;
    p.row_c2[row] = c.y / n;
  }
}

// Fallback backward, step 2: CTA = (column tile, row group); each thread owns VEC columns,
// walks the group's rows, writes dx and keeps dweight/dbias sums in registers.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) bwd_tiles_kernel(BwdParams p, int64_t rows_per_group) {
  const int n = p.n;
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= n) return;  // no CTA-level synchronization below
  float dw[VEC] = {}, db[VEC] = {}, w[VEC], b[VEC];
  if (p.w) load_param<T, VEC>(p.w, p.params_fp32, col, w);
  if (p.b) load_param<T, VEC>(p.b, p.params_fp32, col, b);
  const int64_t first = blockIdx.y * rows_per_group;
  const int64_t last = min(p.rows, first + rows_per_group);
  for (int64_t row = first; row < last; ++row) {
    const float mean = p.mean[row], rstd = p.rstd[row];
    const float c1 = p.row_c1[row], c2 = p.row_c2[row];
    float x[VEC], dy[VEC], dx[VEC];
    load_float<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, x);
    load_float<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + col, dy);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xhat = (x[j] - mean) * rstd;
      float z = xhat;
      if (p.w) z *= w[j];
      if (p.b) z += b[j];
      const float dz = dy[j] * gelu_grad(z, p.tanh);
      dw[j] += dz * xhat;
      db[j] += dz;
      const float dxhat = p.w ? dz * w[j] : dz;
      dx[j] = rstd * (dxhat - c1 - xhat * c2);
    }
    store_float<T, VEC>(static_cast<T*>(p.dx) + row * n + col, dx);
  }
  const int64_t at = blockIdx.y * static_cast<int64_t>(n) + col;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (p.dw_part) p.dw_part[at + j] = dw[j];
    if (p.db_part) p.db_part[at + j] = db[j];
  }
}

// out[c] = sum over slots of part[slot, c], in a fixed order (deterministic).
// CTA (32, 8): 32 columns; the 8 thread rows take slots with stride 8, then add up in order.
template <typename OutT>
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* __restrict__ part,
                                                           int64_t slots, int n,
                                                           OutT* __restrict__ out) {
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < n)
    for (int64_t k = threadIdx.y; k < slots; k += 8) s += part[k * n + col];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += acc[k][threadIdx.x];
    out[col] = from_float<OutT>(total);
  }
}

}  // namespace deepkern::lngelu
