"""Reference for the INT4 group-dequant matmul (W4A16).

    W = Int4Weight.dequantize(dtype)     the dense [N, K] weight, rounded once to x's dtype
                                          (fp16/bf16; fp32 and fp64 inputs use the exact fp32
                                          product, see deepkern/quant/int4.py)
    y = x @ W.T + bias                    in fp32 (fp64 for fp64 inputs), rounded to x's dtype

Differentiable in x and bias through torch autograd, so it also serves as the "torch"
backend (it materializes the dense weight: a reference, not a fast path).
"""

from __future__ import annotations

import torch

from deepkern.quant.int4 import Int4Weight, dequantize_parts


def int4_matmul_ref_parts(x, packed, scales, zeros, k: int, group_size: int, bias=None):
    """int4_matmul_ref on the tensors of an Int4Weight (group_size as stored: -1 = channelwise)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = dequantize_parts(packed, scales, zeros, k, group_size, w_dtype).to(compute)
    y = x.to(compute) @ w.t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def int4_matmul_ref(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ w.dequantize(x.dtype).T (+ bias), fp32 math, in x's dtype."""
    return int4_matmul_ref_parts(x, w.packed, w.scales, w.zeros, w.k, w.group_size, bias)
