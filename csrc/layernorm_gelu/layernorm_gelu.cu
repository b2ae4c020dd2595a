// Fused LayerNorm/RMSNorm + GELU, forward and backward.
//
//   h = x + residual (optional, rounded to x's dtype and stored); y = GELU(norm(h) * w + b)
//
// Memory-bound: the forward reads x (and residual) once and writes y (and h); the backward
// reads x and dy once and writes dx. Two shapes of kernel:
//   *_regs: the row lives in registers (one warp, or up to 512 threads, per row). Used when a
//           thread holds at most ITERS x 16 bytes of the row (hidden <= 32768 for 16-bit
//           forward, <= 12288 backward).
//   *_loop: longer rows. Forward: per-thread Chan/Welford statistics, then a second pass that
//           re-reads the row (mostly from L2). Backward: a per-row statistics kernel, then a
//           column-tiled kernel that writes dx and the weight-gradient partials.
// dweight/dbias: every block (or row group) writes fp32 column partials; a second kernel sums
// them in a fixed order, so the result has the same bits run to run.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/device.h"
#include "common/vec.cuh"

namespace deepkern {
namespace {

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
  float* row_c1;  // [rows] mean(dxhat) (loop path)
  float* row_c2;  // [rows] mean(dxhat * xhat) (loop path)
  int64_t rows;
  int n;
  bool rms;
  bool tanh;
};

// ---------------------------------------------------------------------------------------
// Forward, row in registers. Threads [g*tpr, (g+1)*tpr) of a block serve row group g; thread t
// holds vectors t, t + tpr, ... (coalesced for every i).
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(512) fwd_regs_kernel(FwdParams p, int tpr) {
  __shared__ float scratch[32];
  const int rows_per_block = blockDim.x / tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + group;
  const bool active = row < p.rows;
  const int n = p.n;

  float v[ITERS][VEC];
  bool ok[ITERS];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * tpr + t) * VEC;
    ok[i] = active && col < n;
    if (ok[i]) {
      load_float_stream<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, v[i]);
      if (p.res) {
        float r[VEC];
        load_float_stream<T, VEC>(static_cast<const T*>(p.res) + row * p.res_stride + col, r);
        float hv[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) hv[j] = to_float(from_float<T>(v[i][j] + r[j]));
        store_float<T, VEC>(static_cast<T*>(p.h) + row * n + col, hv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = hv[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
    }
  }

  const int warps = tpr / 32;
  float mean = 0.f;
  if (!p.rms) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += v[i][j];
    mean = group_sum(s, warps, scratch) / n;
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (!ok[i]) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = v[i][j] - mean;
      ss += d * d;
    }
  }
  const float rstd = rsqrtf(group_sum(ss, warps, scratch) / n + p.eps);
  if (active && t == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (!ok[i]) continue;
    const int col = (i * tpr + t) * VEC;
    float w[VEC], b[VEC];
    if (p.w) load_param<T, VEC>(p.w, p.params_fp32, col, w);
    if (p.b) load_param<T, VEC>(p.b, p.params_fp32, col, b);
    float out[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float z = (v[i][j] - mean) * rstd;
      if (p.w) z *= w[j];
      if (p.b) z += b[j];
      out[j] = gelu(z, p.tanh);
    }
    store_float<T, VEC>(static_cast<T*>(p.y) + row * n + col, out);
  }
}

// ---------------------------------------------------------------------------------------
// Forward for long rows: one row per block. Pass 1 keeps per-thread (count, mean, M2) and
// merges them with Chan's formula (exact two-pass inside each vector); pass 2 re-reads the
// row (h when a residual was added) and writes y.
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

__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments o{__shfl_xor_sync(0xffffffffu, m.count, offset),
              __shfl_xor_sync(0xffffffffu, m.mean, offset),
              __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, o);
  }
  return m;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024) fwd_loop_kernel(FwdParams p) {
  __shared__ Moments scratch[32];
  const int64_t row = blockIdx.x;
  const int n = p.n;
  const int nvec = n / VEC;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  T* h = p.res ? static_cast<T*>(p.h) + row * n : nullptr;

  Moments m{0.f, 0.f, 0.f};
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float v[VEC];
    load_float<T, VEC>(x + c * VEC, v);
    if (p.res) {
      float r[VEC];
      load_float_stream<T, VEC>(static_cast<const T*>(p.res) + row * p.res_stride + c * VEC, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(v[j] + r[j]));
      store_float<T, VEC>(h + c * VEC, v);
    }
    if (p.rms) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += v[j] * v[j];
      m.count += VEC, m.m2 += ss;  // mean stays 0, so merge() just adds the sums of squares
    } else {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += v[j];
      const float vm = s / VEC;
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += (v[j] - vm) * (v[j] - vm);
      m = merge(m, Moments{float(VEC), vm, ss});
    }
  }
  m = warp_merge(m);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = m;
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

// ---------------------------------------------------------------------------------------
// Backward, row in registers, persistent: each row group walks rows with a grid stride and
// keeps its columns' dweight/dbias sums in registers; slot = blockIdx.x * rows_per_block +
// group writes them to the partial buffers at the end.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(384) bwd_regs_kernel(BwdParams p, int tpr) {
  __shared__ float scratch[2][32];
  const int rows_per_block = blockDim.x / tpr;
  const int group = threadIdx.x / tpr;
  const int t = threadIdx.x % tpr;
  const int warps = tpr / 32;
  const int n = p.n;

  float dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i][j] = db[i][j] = 0.f;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + group;
    const bool active = row < p.rows;
    const float mean = active ? p.mean[row] : 0.f;
    const float rstd = active ? p.rstd[row] : 0.f;
    float xh[ITERS][VEC], g[ITERS][VEC];  // xhat, then dxhat
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (i * tpr + t) * VEC;
      if (active && col < n) {
        float x[VEC], dy[VEC], w[VEC], b[VEC];
        load_float_stream<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, x);
        load_float_stream<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + col, dy);
        if (p.w) load_param<T, VEC>(p.w, p.params_fp32, col, w);
        if (p.b) load_param<T, VEC>(p.b, p.params_fp32, col, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xhat = (x[j] - mean) * rstd;
          float z = xhat;
          if (p.w) z *= w[j];
          if (p.b) z += b[j];
          const float dz = dy[j] * gelu_grad(z, p.tanh);
          dw[i][j] += dz * xhat;
          db[i][j] += dz;
          const float dxhat = p.w ? dz * w[j] : dz;
          xh[i][j] = xhat;
          g[i][j] = dxhat;
          c1 += dxhat;
          c2 += dxhat * xhat;
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xh[i][j] = g[i][j] = 0.f;
      }
    }
    if (p.rms) c1 = 0.f;
    c1 = group_sum(c1, warps, scratch[0]) / n;
    c2 = group_sum(c2, warps, scratch[1]) / n;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (i * tpr + t) * VEC;
      if (!(active && col < n)) continue;
      float dx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dx[j] = rstd * (g[i][j] - c1 - xh[i][j] * c2);
      store_float<T, VEC>(static_cast<T*>(p.dx) + row * n + col, dx);
    }
  }

  const int64_t slot = static_cast<int64_t>(blockIdx.x) * rows_per_block + group;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * tpr + t) * VEC;
    if (col >= n) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (p.dw_part) p.dw_part[slot * n + col + j] = dw[i][j];
      if (p.db_part) p.db_part[slot * n + col + j] = db[i][j];
    }
  }
}

// Backward for long rows, step 1: per-row c1 = mean(dxhat), c2 = mean(dxhat * xhat).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) bwd_row_stats_kernel(BwdParams p) {
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
  const int warps = (blockDim.x + 31) / 32;
  c1 = group_sum(c1, warps, scratch[0]);
  c2 = group_sum(c2, warps, scratch[1]);
  if (threadIdx.x == 0) {
    p.row_c1[row] = p.rms ? 0.f : c1 / n;
    p.row_c2[row] = c2 / n;
  }
}

// Backward for long rows, step 2: block (column tile, row group); each thread owns VEC
// columns, walks the group's rows, writes dx and keeps dweight/dbias sums in registers.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) bwd_tiles_kernel(BwdParams p, int64_t rows_per_group) {
  const int n = p.n;
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= n) return;  // no block-level synchronization below
  float dw[VEC] = {}, db[VEC] = {}, w[VEC], b[VEC];
  if (p.w) load_param<T, VEC>(p.w, p.params_fp32, col, w);
  if (p.b) load_param<T, VEC>(p.b, p.params_fp32, col, b);
  const int64_t first = blockIdx.y * rows_per_group;
  const int64_t last = min(p.rows, first + rows_per_group);
  for (int64_t row = first; row < last; ++row) {
    const float mean = p.mean[row], rstd = p.rstd[row];
    const float c1 = p.row_c1[row], c2 = p.row_c2[row];
    float x[VEC], dy[VEC], dx[VEC];
    load_float_stream<T, VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, x);
    load_float_stream<T, VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + col, dy);
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
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (p.dw_part) p.dw_part[blockIdx.y * static_cast<int64_t>(n) + col + j] = dw[j];
    if (p.db_part) p.db_part[blockIdx.y * static_cast<int64_t>(n) + col + j] = db[j];
  }
}

// out[c] = sum over slots of part[slot, c], summed in a fixed order (deterministic).
// Block (32, 8): 32 columns; the 8 rows of threads take slots with stride 8, then add up.
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

// ---------------------------------------------------------------------------------------
// Launch configuration.

constexpr int kMaxRegsTprFwd = 512;  // threads per row, register path
// Backward keeps xhat, dxhat and the two weight-gradient sums per column: at ITERS=4 and
// 16-bit data that is 128 live floats a thread, so at most 384 threads (170 registers).
constexpr int kMaxRegsTprBwd = 384;

struct RegsConfig {
  int iters = 0;  // 0: use the loop path
  int tpr = 0;
};

// Smallest ITERS in {1,2,4,8} (bwd: {1,2,4}) that fits the row in <= max_tpr threads, then
// the fewest threads per row. One warp per row up to 32 * ITERS vectors.
RegsConfig regs_config(int nvec, bool backward) {
  const int max_iters = backward ? 4 : 8;
  const int max_tpr = backward ? kMaxRegsTprBwd : kMaxRegsTprFwd;
  for (int iters = 1; iters <= max_iters; iters *= 2) {
    // Prefer 4 vectors per thread once a row needs more than a warp: more bytes in flight
    // per thread, fewer threads in the reductions.
    if (nvec > 32 * iters && iters < 4) continue;
    const int tpr = ((nvec + iters - 1) / iters + 31) / 32 * 32;
    if (tpr <= max_tpr) return {iters, tpr};
  }
  return {};
}

template <typename T>
int vec_width(const void* a, const void* b, const void* c, const void* d, int64_t s1, int64_t s2,
              int n) {
  constexpr int kVec = 16 / sizeof(T);
  auto aligned = [](const void* ptr) {
    return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  };
  const bool ok = n % kVec == 0 && s1 % kVec == 0 && s2 % kVec == 0 && aligned(a) &&
                  aligned(b) && aligned(c) && aligned(d);
  return ok ? kVec : 1;
}

template <typename T, int VEC>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const RegsConfig cfg = regs_config(p.n / VEC, false);
  if (cfg.iters == 0) {
    fwd_loop_kernel<T, VEC><<<p.rows, 1024, 0, stream>>>(p);
    return;
  }
  const int threads = std::max(cfg.tpr, 128);
  const int rows_per_block = threads / cfg.tpr;
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  switch (cfg.iters) {
    case 1: fwd_regs_kernel<T, VEC, 1><<<blocks, threads, 0, stream>>>(p, cfg.tpr); break;
    case 2: fwd_regs_kernel<T, VEC, 2><<<blocks, threads, 0, stream>>>(p, cfg.tpr); break;
    case 4: fwd_regs_kernel<T, VEC, 4><<<blocks, threads, 0, stream>>>(p, cfg.tpr); break;
    default: fwd_regs_kernel<T, VEC, 8><<<blocks, threads, 0, stream>>>(p, cfg.tpr); break;
  }
}

template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int device) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return static_cast<int64_t>(std::max(per_sm, 1)) * num_sms(device);
}

// Returns the number of partial slots written.
template <typename T, int VEC>
int64_t launch_bwd(BwdParams p, const at::Tensor& x, cudaStream_t stream,
                   at::Tensor& dw_part, at::Tensor& db_part, at::Tensor& stats) {
  const int device = x.get_device();
  const RegsConfig cfg = regs_config(p.n / VEC, true);
  auto alloc_parts = [&](int64_t slots) {
    const auto f32 = x.options().dtype(at::kFloat);
    if (p.w) dw_part = at::empty({slots, p.n}, f32);
    if (p.b) db_part = at::empty({slots, p.n}, f32);
    p.dw_part = p.w ? dw_part.data_ptr<float>() : nullptr;
    p.db_part = p.b ? db_part.data_ptr<float>() : nullptr;
  };
  if (cfg.iters != 0) {
    const int threads = std::max(cfg.tpr, 128);
    const int rows_per_block = threads / cfg.tpr;
    const int64_t needed = (p.rows + rows_per_block - 1) / rows_per_block;
    auto run = [&](auto kernel) {
      const int64_t blocks = std::min(needed, resident_blocks(kernel, threads, device));
      alloc_parts(blocks * rows_per_block);
      kernel<<<blocks, threads, 0, stream>>>(p, cfg.tpr);
      return blocks * rows_per_block;
    };
    switch (cfg.iters) {
      case 1: return run(bwd_regs_kernel<T, VEC, 1>);
      case 2: return run(bwd_regs_kernel<T, VEC, 2>);
      default: return run(bwd_regs_kernel<T, VEC, 4>);
    }
  }
  stats = at::empty({2, p.rows}, x.options().dtype(at::kFloat));
  p.row_c1 = stats.data_ptr<float>();
  p.row_c2 = p.row_c1 + p.rows;
  bwd_row_stats_kernel<T, VEC><<<p.rows, 1024, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 256;
  const int64_t col_blocks = (p.n / VEC + threads - 1) / threads;
  // Enough row groups for ~4 blocks per SM; each group's partials cost n floats.
  const int64_t want = std::max<int64_t>(1, 4 * num_sms(device) / col_blocks);
  const int64_t groups = std::min<int64_t>(want, p.rows);
  const int64_t rows_per_group = (p.rows + groups - 1) / groups;
  const int64_t slots = (p.rows + rows_per_group - 1) / rows_per_group;
  alloc_parts(slots);
  bwd_tiles_kernel<T, VEC>
      <<<dim3(col_blocks, slots), threads, 0, stream>>>(p, rows_per_group);
  return slots;
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

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "layernorm_gelu: unsupported dtype ", dtype);
  }
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
  p.tanh = tanh_approx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    // fp32 params need 32-byte-aligned vectors of 8: alignment of 16 bytes covers 4-float loads.
    if (vec_width<T>(p.x, p.res, p.w, p.b, p.x_stride, p.res_stride, n) == kVec)
      launch_fwd<T, kVec>(p, stream);
    else
      launch_fwd<T, 1>(p, stream);
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
  p.tanh = tanh_approx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dw_part, db_part, stats;
  int64_t slots = 0;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    if (vec_width<T>(p.x, p.dy, p.w, p.b, p.x_stride, p.dy_stride, n) == kVec)
      slots = launch_bwd<T, kVec>(p, x, stream, dw_part, db_part, stats);
    else
      slots = launch_bwd<T, 1>(p, x, stream, dw_part, db_part, stats);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 block(32, 8);
  const int col_blocks = (n + 31) / 32;
  for (auto [part, out] : {std::pair{&dw_part, &dw}, std::pair{&db_part, &db}}) {
    if (!part->defined()) continue;
    if (out->scalar_type() == at::kFloat)
      sum_partials_kernel<float><<<col_blocks, block, 0, stream>>>(
          part->data_ptr<float>(), slots, n, out->data_ptr<float>());
    else if (out->scalar_type() == at::kHalf)
      sum_partials_kernel<__half><<<col_blocks, block, 0, stream>>>(
          part->data_ptr<float>(), slots, n, static_cast<__half*>(out->data_ptr()));
    else
      sum_partials_kernel<__nv_bfloat16><<<col_blocks, block, 0, stream>>>(
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
