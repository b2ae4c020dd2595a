// Device code of the layernorm_gelu backward (forward and shared helpers: kernels.cuh).
#pragma once

#include "kernels.cuh"
#include "ring.cuh"

namespace deepkern::lngelu {

// ---------------------------------------------------------------------------------------
// Backward with a copy ring (ring.cuh). The backward does ~40 instructions per element
// against 6 bytes of traffic, so on the H100 it is limited by issue slots as much as by
// memory: the register-prefetching bwd_rows_kernel (64-register cap at 1024 threads) spilled
// and ran at 53% of copy bandwidth at 16384x8192; this kernel 91% (2 vectors per thread).
//
// Walker w = (cluster index) * rows_per_cta + group visits rows w, w + walkers, ...; a
// cluster of `ctas` CTAs shares each row (CTA `rank` holds vectors [rank * ITERS * tpr,
// (rank + 1) * ITERS * tpr)). weight/bias and the dweight/dbias sums stay in registers
// across rows; the partial row w gets the sums at the end.
template <typename T, typename PT, int ITERS, bool TANH>
__global__ void __launch_bounds__(1024 / ITERS, 1) bwd_ring_kernel(BwdParams p, int tpr, int ctas) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int S = kRingStages;
  // Per thread and stage: its vectors of x and dy, and the row's mean and rstd.
  extern __shared__ uint4 ring[];  // [S][2: x, dy][ITERS][blockDim.x], then float2 [S][blockDim.x]
  __shared__ float2 red[2][32];
  __shared__ float2 cl[2][kMaxClusterRing];
  const int nt = blockDim.x, group = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int rows_per_cta = nt / tpr;
  const int rank = blockIdx.x % ctas;
  const int base = rank * ITERS * tpr;
  const int n = p.n, nvec = n / VEC, warps = tpr / 32;
  const float inv_n = 1.f / n;
  const int64_t first = static_cast<int64_t>(blockIdx.x / ctas) * rows_per_cta;
  const int64_t stride = static_cast<int64_t>(gridDim.x / ctas) * rows_per_cta;
  uint4* const mine = ring + threadIdx.x;
  auto slot = [&](int stage, int tensor, int i) { return mine + ((stage * 2 + tensor) * ITERS + i) * nt; };
  float2* const stats = reinterpret_cast<float2*>(ring + S * 2 * ITERS * nt) + threadIdx.x;

  // The copy side: the next row to fetch, its stage, and running pointers to this thread's
  // first vector of it (64-bit products once, not per step).
  int64_t fetch_row = first + group;
  int fetch_stage = 0;
  const T* fx = static_cast<const T*>(p.x) + fetch_row * p.x_stride + (base + t) * VEC;
  const T* fdy = static_cast<const T*>(p.dy) + fetch_row * p.dy_stride + (base + t) * VEC;
  const int64_t fx_step = stride * p.x_stride, fdy_step = stride * p.dy_stride;
  bool vec_ok[ITERS];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) vec_ok[i] = base + i * tpr + t < nvec;
  auto issue = [&]() {  // one commit group per step, empty copies past the end
    const bool row_ok = fetch_row < p.rows;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const bool ok = row_ok && vec_ok[i];
      cp_async<16>(slot(fetch_stage, 0, i), ok ? fx + i * tpr * VEC : p.x, ok);
      cp_async<16>(slot(fetch_stage, 1, i), ok ? fdy + i * tpr * VEC : p.dy, ok);
    }
    cp_async<4>(&stats[fetch_stage * nt].x, row_ok ? p.mean + fetch_row : p.mean, row_ok);
    cp_async<4>(&stats[fetch_stage * nt].y, row_ok ? p.rstd + fetch_row : p.rstd, row_ok);
    cp_async_commit();
    fetch_row += stride;
    fx += fx_step;
    fdy += fdy_step;
    fetch_stage = fetch_stage == S - 1 ? 0 : fetch_stage + 1;
  };

  Pack<PT, VEC> pw[ITERS], pb[ITERS];
  float dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    load_wb_packs<PT, VEC>(p.w, p.b, min(base + i * tpr + t, nvec - 1) * VEC, pw[i], pb[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i][j] = 0.f, db[i][j] = 0.f;
  }
  if (ctas > 1) cluster_barrier();  // every CTA of the cluster runs before any pushes to it
#pragma unroll
  for (int k = 0; k < S - 1; ++k) issue();

  int64_t row = first + group;
  T* out_row = static_cast<T*>(p.dx) + row * n + (base + t) * VEC;
  const int64_t out_step = stride * n;
  int stage = 0;
  for (int k = 0; first + k * stride < p.rows; ++k) {  // uniform per cluster
    issue();
    cp_async_wait<S - 1>();  // this step's group has landed
    const float2 ms = stats[stage * nt];
    const float mean = ms.x, rstd = ms.y;
    float g[ITERS][VEC];  // dxhat
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const uint4 rx = *slot(stage, 0, i);
      const uint4 rdy = *slot(stage, 1, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // Past the row's end dy is 0, so dz, dxhat and every sum below get exact zeros.
        const float xhat = (widen<T>(rx, j) - mean) * rstd;
        const float wj = to_float(pw[i].v[j]);
        const float dz = widen<T>(rdy, j) * gelu_grad<TANH, T>(fmaf(xhat, wj, to_float(pb[i].v[j])));
        dw[i][j] = fmaf(dz, xhat, dw[i][j]);
        db[i][j] += dz;
        g[i][j] = dz * wj;
        c1 += g[i][j];
        c2 = fmaf(g[i][j], xhat, c2);
      }
    }
    const float2 c = ring_row_sum(c1, c2, warps, ctas, rank, k & 1, red, cl);
    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), as
    // fma(g, rstd, fma(x - mean, -rstd^2 * m2, -rstd * m1)).
    const float a1 = p.rms ? 0.f : -rstd * c.x * inv_n, a2 = -rstd * rstd * c.y * inv_n;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      if (!(row < p.rows && vec_ok[i])) continue;
      const uint4 rx = *slot(stage, 0, i);  // re-read: no registers held across the reduction
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out.v[j] = from_float<T>(fmaf(g[i][j], rstd, fmaf(widen<T>(rx, j) - mean, a2, a1)));
      __stcs(reinterpret_cast<uint4*>(out_row + i * tpr * VEC), *reinterpret_cast<const uint4*>(&out));
    }
    row += stride;
    out_row += out_step;
    stage = stage == S - 1 ? 0 : stage + 1;
  }
  cp_async_wait<0>();  // no copy may land after exit

  const int64_t at_row = first + group;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (!vec_ok[i]) continue;
    const int64_t at = at_row * n + (base + i * tpr + t) * VEC;
    if (p.dw_part) store_float<float, VEC>(p.dw_part + at, dw[i]);
    if (p.db_part) store_float<float, VEC>(p.db_part + at, db[i]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward, row in registers. Walker w (= blockIdx.x * rows_per_cta + group) visits rows
// w, w + walkers, ... and writes its columns' dweight/dbias sums to partial row w at the end.
// A thread's columns never change, so weight/bias and the dweight/dbias sums stay in
// registers across rows (H100 16384x8192 bf16: 583 us with the sums in shared memory and
// weight/bias re-read per row); the next row's x and dy are loaded before the current row is
// reduced.
template <typename T, typename PT, int VEC, int ITERS, bool TANH>
__global__ void __launch_bounds__(1024 / ITERS) bwd_rows_kernel(BwdParams p, int tpr) {
  __shared__ float scratch[2][32];
  const int group = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int rows_per_cta = blockDim.x / tpr;
  const int n = p.n, nvec = n / VEC, warps = tpr / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_cta;

  // Registers per thread (ITERS = 2, bf16): raw weight/bias packs 8, sums 32, dxhat 16, this
  // row's and the next row's x/dy packs 16 + 16 (fp32 weight/bias and a kept xhat spilled).
  Pack<PT, VEC> pw[ITERS], pb[ITERS];
  float dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    load_wb_packs<PT, VEC>(p.w, p.b, min(i * tpr + t, nvec - 1) * VEC, pw[i], pb[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i][j] = 0.f, db[i][j] = 0.f;
  }

  Pack<T, VEC> nx[ITERS], ndy[ITERS];  // the next row's
  auto fetch = [&](int64_t row) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const bool ok = row < p.rows && i * tpr + t < nvec;
      nx[i] = fetch_pack<T, VEC>(p.x, row, p.x_stride, i * tpr + t, ok);
      ndy[i] = fetch_pack<T, VEC>(p.dy, row, p.dy_stride, i * tpr + t, ok);  // 0 past the end
    }
  };
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_cta;
  fetch(first + group);

  for (int64_t base = first; base < p.rows; base += stride) {  // same trip count CTA-wide
    const int64_t row = base + group;
    const bool active = row < p.rows;
    const float mean = active ? p.mean[row] : 0.f;
    const float rstd = active ? p.rstd[row] : 0.f;
    Pack<T, VEC> rx[ITERS], rdy[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) rx[i] = nx[i], rdy[i] = ndy[i];
    fetch(row + stride);  // in flight during this row's math, reduction and stores
    float g[ITERS][VEC];  // dxhat
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // Past the row's end dy is 0, so dz, dxhat and every sum below get exact zeros.
        const float xhat = (to_float(rx[i].v[j]) - mean) * rstd;
        const float wj = to_float(pw[i].v[j]);
        const float dz = to_float(rdy[i].v[j]) * gelu_grad<TANH, T>(fmaf(xhat, wj, to_float(pb[i].v[j])));
        dw[i][j] = fmaf(dz, xhat, dw[i][j]);
        db[i][j] += dz;
        g[i][j] = dz * wj;
        c1 += g[i][j];
        c2 = fmaf(g[i][j], xhat, c2);
      }
    }

    const float2 c = group_sum2(make_float2(c1, c2), warps, scratch);
    const float m1 = p.rms ? 0.f : c.x / n, m2 = c.y / n;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int vi = i * tpr + t;
      if (!(active && vi < nvec)) continue;
      float dx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (to_float(rx[i].v[j]) - mean) * rstd;  // as above, bit for bit
        dx[j] = rstd * (g[i][j] - m1 - xhat * m2);
      }
      store_float<T, VEC>(static_cast<T*>(p.dx) + row * n + vi * VEC, dx);
    }
  }

  const int64_t slot = first + group;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int vi = i * tpr + t;
    if (vi >= nvec) continue;
    const int64_t at = slot * n + vi * VEC;
    if (p.dw_part) store_float<float, VEC>(p.dw_part + at, dw[i]);
    if (p.db_part) store_float<float, VEC>(p.db_part + at, db[i]);
  }
}

// dL/dz at element j of the fallback kernels, z = xhat * w + b (weight 1, bias 0 when absent).
template <bool TANH, typename T, int VEC>
__device__ __forceinline__ float fallback_dz(const BwdParams& p, float xhat, float dy,
                                             const float (&w)[VEC], const float (&b)[VEC], int j) {
  float z = xhat;
  if (p.w) z *= w[j];
  if (p.b) z += b[j];
  return dy * gelu_grad<TANH, T>(z);
}

// Fallback backward for long rows, step 1: per-row c1 = mean(dxhat), c2 = mean(dxhat * xhat).
template <typename T, int VEC, bool TANH>
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
      float dxhat = fallback_dz<TANH, T>(p, xhat, dy[j], w, b, j);
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
template <typename T, int VEC, bool TANH>
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
      const float dz = fallback_dz<TANH, T>(p, xhat, dy[j], w, b, j);
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
