// Fused LayerNorm/RMSNorm + GELU: launch configuration and op entry points. The kernels and
// the design notes are in kernels.cuh.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/device.h"
#include "layernorm_gelu/kernels.cuh"

namespace deepkern {
namespace {

using lngelu::BwdParams;
using lngelu::FwdParams;

// ---------------------------------------------------------------------------------------
// Launch configuration.
//
// A row of nvec 16-byte vectors is spread over `cluster` CTAs x `tpr` threads, each thread
// holding `iters` vectors. Fewer vectors per thread mean fewer registers, so more rows in
// flight per SM; a CTA has at most 512 threads.

struct RowsConfig {
  int iters = 0;  // 0: rows too long for the register paths here
  int tpr = 0;  // threads per row (per CTA of the cluster)
  int cluster = 1;
};

bool clusters_available(int device) {
#ifdef DEEPKERN_HAS_SM90A
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
#else
  (void)device;
  return false;
#endif
}

// Optional override for tuning sweeps: DEEPKERN_LNG_FWD / DEEPKERN_LNG_BWD = "iters,cluster".
bool env_override(const char* name, int& iters, int& cluster) {
  const char* v = std::getenv(name);
  return v != nullptr && std::sscanf(v, "%d,%d", &iters, &cluster) == 2;
}

RowsConfig rows_config(int nvec, bool backward, bool vectorized, int device) {
  constexpr int kMaxTpr = 512;
  int want_iters = 0, want_cluster = 0;
  if (env_override(backward ? "DEEPKERN_LNG_BWD" : "DEEPKERN_LNG_FWD", want_iters, want_cluster)) {
    const int tpr = ((nvec + want_iters * want_cluster - 1) / (want_iters * want_cluster) + 31) / 32 * 32;
    if (tpr <= kMaxTpr && (want_cluster == 1 || (vectorized && clusters_available(device))))
      return {want_iters, tpr, want_cluster};
  }
  // One warp per row for short rows (no CTA barriers in the reductions).
  if (nvec <= 32) return {1, 32, 1};
  if (nvec <= 64) return {2, 32, 1};
  if (nvec <= 128) return {4, 32, 1};
  const int max_iters = backward ? 2 : 4;
  const int max_cluster = vectorized && clusters_available(device) ? 8 : 1;
  for (int cluster = 1; cluster <= max_cluster; cluster *= 2) {
    for (int iters = 1; iters <= max_iters; iters *= 2) {
      const int tpr = ((nvec + iters * cluster - 1) / (iters * cluster) + 31) / 32 * 32;
      if (tpr <= kMaxTpr) return {iters, tpr, cluster};
    }
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

// Launches `kernel` persistently: at most as many CTAs (clusters) as fit on the GPU at once.
// prepare(walkers) runs just before the launch with the number of row walkers (= weight-
// gradient partial rows); returns that number.
template <typename Kernel, typename Params, typename Prepare>
int64_t launch_rows(Kernel kernel, Params& p, const RowsConfig& cfg, int device,
                    cudaStream_t stream, Prepare&& prepare) {
  const int threads = cfg.cluster > 1 ? cfg.tpr : std::max(cfg.tpr, 128);
  const int rows_per_cta = cfg.cluster > 1 ? 1 : threads / cfg.tpr;
  cudaLaunchConfig_t lc = {};
  lc.blockDim = dim3(threads);
  lc.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cfg.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  int64_t walkers;
  if (cfg.cluster > 1) {
    lc.gridDim = dim3(cfg.cluster * 1024);  // a placeholder for the occupancy query
    lc.attrs = attr;
    lc.numAttrs = 1;
    int clusters = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &lc));
    walkers = std::min<int64_t>(p.rows, std::max(clusters, 1));
    lc.gridDim = dim3(walkers * cfg.cluster);
  } else {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
    const int64_t ctas = std::min<int64_t>((p.rows + rows_per_cta - 1) / rows_per_cta,
                                           static_cast<int64_t>(std::max(per_sm, 1)) * num_sms(device));
    lc.gridDim = dim3(ctas);
    walkers = ctas * rows_per_cta;
  }
  prepare(walkers);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, p, cfg.tpr));
  return walkers;
}

// Instantiates kernel<T, VEC, iters, cluster> for the runtime (iters, cluster).
#define DEEPKERN_LNG_DISPATCH(KERNEL, T, VEC, cfg, ...)                                       \
  [&]() -> int64_t {                                                                            \
    switch ((cfg).cluster * 16 + (cfg).iters) {                                                 \
      case 16 + 1: return launch_rows(KERNEL<T, VEC, 1, 1>, __VA_ARGS__);                        \
      case 16 + 2: return launch_rows(KERNEL<T, VEC, 2, 1>, __VA_ARGS__);                        \
      case 16 + 4: return launch_rows(KERNEL<T, VEC, 4, 1>, __VA_ARGS__);                        \
      case 32 + 1: return launch_rows(KERNEL<T, VEC, 1, (VEC > 1 ? 2 : 1)>, __VA_ARGS__);        \
      case 32 + 2: return launch_rows(KERNEL<T, VEC, 2, (VEC > 1 ? 2 : 1)>, __VA_ARGS__);        \
      case 32 + 4: return launch_rows(KERNEL<T, VEC, 4, (VEC > 1 ? 2 : 1)>, __VA_ARGS__);        \
      case 64 + 1: return launch_rows(KERNEL<T, VEC, 1, (VEC > 1 ? 4 : 1)>, __VA_ARGS__);        \
      case 64 + 2: return launch_rows(KERNEL<T, VEC, 2, (VEC > 1 ? 4 : 1)>, __VA_ARGS__);        \
      case 64 + 4: return launch_rows(KERNEL<T, VEC, 4, (VEC > 1 ? 4 : 1)>, __VA_ARGS__);        \
      case 128 + 1: return launch_rows(KERNEL<T, VEC, 1, (VEC > 1 ? 8 : 1)>, __VA_ARGS__);       \
      case 128 + 2: return launch_rows(KERNEL<T, VEC, 2, (VEC > 1 ? 8 : 1)>, __VA_ARGS__);       \
      case 128 + 4: return launch_rows(KERNEL<T, VEC, 4, (VEC > 1 ? 8 : 1)>, __VA_ARGS__);       \
    }                                                                                           \
    TORCH_CHECK(false, "layernorm_gelu: no kernel for iters=", (cfg).iters, " cluster=", (cfg).cluster); \
  }()

template <typename T, int VEC>
void launch_fwd(const FwdParams& p, int device, cudaStream_t stream) {
  const RowsConfig cfg = rows_config(p.n / VEC, false, VEC > 1, device);
  if (cfg.iters == 0) {
    lngelu::fwd_loop_kernel<T, VEC><<<p.rows, 1024, 0, stream>>>(p);
    return;
  }
  FwdParams q = p;
  DEEPKERN_LNG_DISPATCH(lngelu::fwd_rows_kernel, T, VEC, cfg, q, cfg, device, stream,
                        [](int64_t) {});
}

// Returns the number of partial rows written.
template <typename T, int VEC>
int64_t launch_bwd(BwdParams p, const at::Tensor& x, int device, cudaStream_t stream,
                   at::Tensor& dw_part, at::Tensor& db_part, at::Tensor& stats) {
  const auto f32 = x.options().dtype(at::kFloat);
  auto alloc_parts = [&](int64_t slots) {
    if (p.w) dw_part = at::empty({slots, p.n}, f32);
    if (p.b) db_part = at::empty({slots, p.n}, f32);
    p.dw_part = p.w ? dw_part.data_ptr<float>() : nullptr;
    p.db_part = p.b ? db_part.data_ptr<float>() : nullptr;
  };
  const RowsConfig cfg = rows_config(p.n / VEC, true, VEC > 1, device);
  if (cfg.iters != 0) {
    return DEEPKERN_LNG_DISPATCH(lngelu::bwd_rows_kernel, T, VEC, cfg, p, cfg, device, stream,
                                 alloc_parts);
  }
  stats = at::empty({2, p.rows}, f32);
  p.row_c1 = stats.data_ptr<float>();
  p.row_c2 = p.row_c1 + p.rows;
  lngelu::bwd_stats_kernel<T, VEC><<<p.rows, 1024, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 256;
  const int64_t col_blocks = (p.n / VEC + threads - 1) / threads;
  // Enough row groups for ~4 CTAs per SM; each group's partials cost n floats.
  const int64_t want = std::max<int64_t>(1, 4 * num_sms(device) / col_blocks);
  const int64_t groups = std::min<int64_t>(want, p.rows);
  const int64_t rows_per_group = (p.rows + groups - 1) / groups;
  const int64_t slots = (p.rows + rows_per_group - 1) / rows_per_group;
  alloc_parts(slots);
  lngelu::bwd_tiles_kernel<T, VEC><<<dim3(col_blocks, slots), threads, 0, stream>>>(p, rows_per_group);
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
  p.tanh = tanh_approx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    if (vector_ok<T>({p.x, p.res, p.w, p.b}, {p.x_stride, p.res_stride}, n))
      launch_fwd<T, kVec>(p, device, stream);
    else
      launch_fwd<T, 1>(p, device, stream);
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
  p.tanh = tanh_approx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dw_part, db_part, stats;
  int64_t slots = 0;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    if (vector_ok<T>({p.x, p.dy, p.w, p.b}, {p.x_stride, p.dy_stride}, n))
      slots = launch_bwd<T, kVec>(p, x, device, stream, dw_part, db_part, stats);
    else
      slots = launch_bwd<T, 1>(p, x, device, stream, dw_part, db_part, stats);
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
