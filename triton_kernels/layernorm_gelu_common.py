"""Shared pieces of the layernorm_gelu Triton kernels (layernorm_gelu.py: forward and the
public launchers; layernorm_gelu_bwd.py: backward): the GELU math and device facts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cuda_facts

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


# Exact (erf) GELU through the normal CDF: Phi(-|z|) = t * Q(t) * exp(-z*z/2), t = 1/(1 + C|z|),
# with C and Q fitted by scripts/fit_gelu_phi.py (it prints these and the errors). Degree 6 for
# 16-bit outputs (max relative error of Phi 6e-6 in fp32 arithmetic, 40x below half an fp16
# ulp), degree 8 for fp32 (6e-7 for |z| <= 2, 3e-6 at z = -6). libdevice erff costs ~23
# instructions per element against 11 + degree here, and 0.5 * (1 + erf(z / sqrt 2)) cancels
# to nothing for z < -4, where this form keeps its relative accuracy.
NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)
C6 = tl.constexpr(3.889087297e-01)
C8 = tl.constexpr(2.828427125e-01)


@triton.jit
def _rcp(d, FAST: tl.constexpr):
    # FAST (compiled for the GPU): one MUFU.RCP. Triton's `/` emits div.full.f32, several
    # instructions per element, and the forward is near its instruction limit. The
    # interpreter has no inline asm.
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / d


@triton.jit
def _phi_tail(z, WIDE: tl.constexpr, FAST: tl.constexpr):
    """(|z|, Phi(-|z|), exp(-z*z/2)); WIDE: the degree-8 fit for fp32 outputs."""
    a = tl.abs(z)
    e = tl.exp2(z * (z * NEG_HALF_LOG2E))
    if WIDE:
        t = _rcp(a * C8 + 1.0, FAST)
        q = t * 2.513013125e-02 - 9.144716956e-02
        q = q * t + 8.453721063e-02
        q = q * t - 2.799373214e-03
        q = q * t + 7.071379143e-02
        q = q * t + 8.427144193e-02
        q = q * t + 1.039212977e-01
        q = q * t + 1.128348014e-01
        q = q * t + 1.128379309e-01
    else:
        t = _rcp(a * C6 + 1.0, FAST)
        q = t * 4.942435523e-02 - 1.509265762e-01
        q = q * t + 8.859074239e-02
        q = q * t + 6.930821865e-02
        q = q * t + 1.333594549e-01
        q = q * t + 1.550938513e-01
        q = q * t + 1.551520857e-01
    return a, q * t * e, e


@triton.jit
def _gelu(z, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr):
    if TANH:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates to +-1 for large |u|. (Tensor operands
        # come first in products with constexprs: `constexpr * tensor` breaks the Triton 3.8
        # interpreter.)
        u = (z + 0.044715 * z * z * z) * SQRT_2_OVER_PI
        return 0.5 * z * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    else:
        # z * Phi(z) = max(z, 0) - |z| * Phi(-|z|): no select.
        a, p, _ = _phi_tail(z, WIDE, FAST)
        return tl.maximum(z, 0.0) - a * p


@triton.jit
def _gelu_grad(z, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr):
    if TANH:
        z2 = z * z
        t = 1.0 - 2.0 / (tl.exp(z * (1.0 + 0.044715 * z2) * SQRT_2_OVER_PI * 2.0) + 1.0)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (1.0 + 0.134145 * z2) * SQRT_2_OVER_PI
    else:
        _, p, e = _phi_tail(z, WIDE, FAST)
        return tl.where(z > 0, 1.0 - p, p) + z * e * INV_SQRT_2PI


@triton.jit
def _affine_gelu(xhat, W, B, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, TANH: tl.constexpr,
                 WIDE: tl.constexpr, FAST: tl.constexpr):
    z = xhat
    if HAS_W:
        z = z * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        z = z + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return _gelu(z, TANH, WIDE, FAST)


def _num_programs_per_device(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs exercise the grid-stride loops
    return cuda_facts(device).sms  # cached: every backward call asks (host time, see perf notes)


def _shared_memory(device: torch.device) -> tuple[int, int]:
    """(opt-in shared memory per block, shared memory per SM) in bytes; the interpreter gets the
    H100's (227 KB, 228 KB) so it runs the pipelined code paths."""
    if device.type != "cuda":
        return 227 * 1024, 228 * 1024
    f = cuda_facts(device)
    return f.smem_per_block_optin, f.smem_per_sm
