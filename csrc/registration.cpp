// Every deepkern op schema lives here, in one place. CUDA kernels register their
// implementations next to the kernel (TORCH_LIBRARY_IMPL(deepkern, CUDA, m) in csrc/<op>/);
// fake (meta) implementations and autograd are registered from Python by
// python/deepkern/ops/<op>.py, which `import deepkern` imports.
// Triton kernels are Python custom ops in the `deepkern_triton` namespace, same op names.
//
// pybind11 serves only build information; ops go through the dispatcher.

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#ifndef DEEPKERN_ARCHS
#define DEEPKERN_ARCHS unknown
#endif
#ifndef DEEPKERN_TORCH_VERSION
#define DEEPKERN_TORCH_VERSION unknown
#endif
#define DEEPKERN_STR_(x) #x
#define DEEPKERN_STR(x) DEEPKERN_STR_(x)

TORCH_LIBRARY(deepkern, m) {
  // ---- fused LayerNorm/RMSNorm + GELU (csrc/layernorm_gelu/) ----
  // h = x + residual when residual is given (else h is an empty tensor and x is normalized);
  // mean/rstd are fp32 [rows] (mean is 0 for rmsnorm). y has x's shape and dtype.
  m.def(
      "layernorm_gelu_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
      "bool rmsnorm, bool tanh) -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // x is the normalized input (h when a residual was added). dweight/dbias are empty when
  // weight/bias are None; they are reduced from fp32 per-block partials (deterministic).
  m.def(
      "layernorm_gelu_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor rstd, bool rmsnorm, bool tanh) -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // ---- INT4 group-dequant GEMM, W4A16 (csrc/int4_matmul/) ----
  // x [M, K] fp16/bf16; packed int32 [N, K/8], scales [K/group, N], zeros uint8 or None
  // (layout v1, python/deepkern/quant/int4.py); group = K per group. y [M, N] in x's dtype.
  // The CUDA kernels take K % 32 == 0 (any M); the Python op routes other calls to Triton.
  m.def(
      "int4_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int group, "
      "Tensor? bias) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["archs"] = std::string(DEEPKERN_STR(DEEPKERN_ARCHS));
  info["torch_version"] = std::string(DEEPKERN_STR(DEEPKERN_TORCH_VERSION));
  info["cuda_runtime_version"] = CUDART_VERSION;  // e.g. 13000 for CUDA 13.0
#ifdef DEEPKERN_HAS_SM90A
  info["sm90a"] = true;
#else
  info["sm90a"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepkern CUDA kernels (ops are registered with torch.ops.deepkern)";
  m.def("build_info", &build_info, "Compile-time facts: target archs, CUDA and torch versions");
}
