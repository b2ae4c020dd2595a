"""Reference for the fused LayerNorm/RMSNorm + GELU op.

    h = x + residual                      (rounded to x's dtype; only when residual is given)
    layernorm: xhat = (h - mean(h)) / sqrt(var(h) + eps)     (biased variance)
    rmsnorm:   xhat = h / sqrt(mean(h^2) + eps)
    y = GELU(xhat * weight + bias)        (exact erf GELU, or the tanh form)

Statistics and arithmetic in fp32 (fp64 for fp64 inputs); y is rounded to x's dtype.
Differentiable through torch autograd, so it also serves as the "torch" backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm_gelu_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    approximate: str = "none",
    residual: torch.Tensor | None = None,
    norm: str = "layernorm",
):
    """Returns y, or (y, h) when `residual` is given."""
    h = x if residual is None else x + residual
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    hf = h.to(compute)
    if norm == "layernorm":
        mean = hf.mean(dim=-1, keepdim=True)
        var = (hf - mean).square().mean(dim=-1, keepdim=True)
        xhat = (hf - mean) * torch.rsqrt(var + eps)
    elif norm == "rmsnorm":
        xhat = hf * torch.rsqrt(hf.square().mean(dim=-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm={norm!r}: expected 'layernorm' or 'rmsnorm'")
    z = xhat
    if weight is not None:
        z = z * weight.to(compute)
    if bias is not None:
        z = z + bias.to(compute)
    y = F.gelu(z, approximate=approximate).to(x.dtype)
    return y if residual is None else (y, h)
