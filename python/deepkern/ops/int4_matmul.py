"""deepkern.int4_matmul: y = x @ W.T (+ bias) with W an Int4Weight (W4A16), dequantized in
registers inside the matmul.

Public function -> validation -> backend choice -> one of
    torch.ops.deepkern_triton.int4_matmul / _bwd   (Triton, triton_kernels/int4_matmul.py)
    torch.ops.deepkern.int4_matmul                 (CUDA, csrc/int4_matmul/; K % 32 == 0; M <= 16
                                                    small_m_kernel, larger M tile_kernel, or on
                                                    Hopper wgmma_kernel; its backward is the
                                                    Triton dx kernel)
    deepkern.reference.int4_matmul_ref             (torch; the only backend for fp32 x)

The custom ops take the Int4Weight's tensors, not the object:
    int4_matmul(x [M, K], packed, scales, zeros?, group, bias?) -> y [M, N]
    int4_matmul_bwd(dy [M, N], packed, scales, zeros?, group, K) -> dx [M, K]
with `group` the number of consecutive K per group (K for channelwise). Autograd gives dx
(dequantizing W tile by tile, no dense copy) and the bias gradient; the weight is frozen.
"""

from __future__ import annotations

import torch

from deepkern import _backend
from deepkern._ext import build_info, has_cuda_ext
from deepkern.ops._layout import as_rows
from deepkern.quant.int4 import Int4Weight, effective_group_size
from deepkern.reference.int4_matmul import int4_matmul_ref_parts

OP = "int4_matmul"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float32,)
_FROZEN = (
    "Int4Weight is frozen: int4_matmul has no gradient for the quantized weight (packed, "
    "scales, zeros); train a dense adapter (e.g. LoRA) or the bias instead"
)


# ------------------------------------------------------------------------------------------
# Triton custom ops


@torch.library.custom_op("deepkern_triton::int4_matmul", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    from deepkern.triton_kernels import int4_matmul as kernels

    return kernels.int4_matmul_fwd(x, packed, scales, zeros, group, bias)


@torch.library.custom_op("deepkern_triton::int4_matmul_bwd", mutates_args=())
def _triton_bwd(
    dy: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group: int,
    k: int,
) -> torch.Tensor:
    from deepkern.triton_kernels import int4_matmul as kernels

    return kernels.int4_matmul_dx(dy, packed, scales, zeros, group, k)


def _fwd_fake(x, packed, scales, zeros, group, bias):
    return x.new_empty((x.shape[0], packed.shape[0]))


def _bwd_fake(dy, packed, scales, zeros, group, k):
    return dy.new_empty((dy.shape[0], k))


def _setup_context(ctx, inputs, output):
    x, packed, scales, zeros, group, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.group = group
    ctx.k = x.shape[1]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _make_backward(bwd_op):
    def backward(ctx, dy):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError(f"int4_matmul: {_FROZEN}")
        packed, scales, zeros = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = bwd_op(as_rows(dy), packed, scales, zeros, ctx.group, ctx.k)
        if ctx.needs_input_grad[5]:
            db = dy.sum(dim=0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, None, None, None, None, db

    return backward


torch.library.register_fake("deepkern_triton::int4_matmul")(_fwd_fake)
torch.library.register_fake("deepkern_triton::int4_matmul_bwd")(_bwd_fake)
torch.library.register_autograd(
    "deepkern_triton::int4_matmul",
    _make_backward(torch.ops.deepkern_triton.int4_matmul_bwd),
    setup_context=_setup_context,
)
if has_cuda_ext():
    torch.library.register_fake("deepkern::int4_matmul")(_fwd_fake)
    torch.library.register_autograd(
        "deepkern::int4_matmul",
        _make_backward(torch.ops.deepkern_triton.int4_matmul_bwd),
        setup_context=_setup_context,
    )


# ------------------------------------------------------------------------------------------
# Validation and backend choice


def _check(who, x, packed, scales, n, k, bias):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{who}: x.dtype must be float16 or bfloat16 (float32 only on backend='torch'), got {x.dtype}"
        )
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(
            f"{who}: x.shape[-1] must equal the weight's K={k} (in_features), got x.shape "
            f"{tuple(x.shape)}"
        )
    if x.device != packed.device:
        raise ValueError(f"{who}: x is on {x.device}, the Int4Weight on {packed.device}")
    if scales.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{who}: {_FROZEN} (its scales have requires_grad=True)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{who}: bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{who}: bias.shape must be ({n},) (out_features), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{who}: bias is on {bias.device}, x on {x.device}")
        if bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{who}: bias.dtype must be x's dtype ({x.dtype}) or float32, got {bias.dtype}")


# auto: the CUDA kernels up to this M, Triton beyond. H100, (K, N) = (8192, 8192) /
# (8192, 28672), fp16, us (.dev/i4_tile.py, CUDA graphs): M=17 CUDA 41.8 / 125.6 vs Triton
# 45.2 / 150.5; M=32 43.6 / 145.2 vs 44.9 / 147.6; M=64 57.5 / 196.7 vs 45.9 / 151.5 (the
# mma.sync tile kernel; on Hopper M = 17-32 run on the wgmma kernel since 8aafff8: M=32 29.2 /
# 81.5 us).
CUDA_FIRST_MAX_M = 32
# ... and past it again where the CUDA wgmma kernel runs (Hopper, sm_90a build, groups of
# >= 128 or channelwise). H100, fp16, us (.dev/bm64_ab.py, CUDA graphs, 2026-11-23 (o)), CUDA
# vs Triton at 8192x8192 / 8192x28672 / 4096x4096 / 14336x4096 / 4096x14336: M=33 39.4 / 103 /
# 16.2 / 36.0 / 35.4 vs 44.8 / 151 / 20.8 / 46.4 / 50.2; M=64 41.1 / 103 / 17.4 / 36.8 / 35.9
# vs 45.9 / 150 / 20.8 / 46.4 / 51.5; M=128 45.5 / 124 / 20.2 / 40.5 / 39.4 vs 59.3 / 186 /
# 27.6 / 65.8 / 51.5; M >= 256 CUDA on all five (M=1024 at 3dec689: 199 / 772 / 53.8 / 170 /
# 206 vs 321 / 1122 / 83.4 / 277 / 326).


_WGMMA: dict[torch.device, bool] = {}


def _wgmma_device(device: torch.device) -> bool:
    """The CUDA extension was built with sm_90a code and `device` is a Hopper GPU. Cached by
    the first eager call; while torch.compile traces, only the cache is read (a device not
    seen eagerly yet counts as no: Triton then serves M >= 256 there)."""
    known = _WGMMA.get(device)
    if known is None:
        if torch.compiler.is_compiling():
            return False
        known = _WGMMA[device] = (device.type == "cuda" and bool(build_info().get("sm90a"))
                                  and torch.cuda.get_device_capability(device) == (9, 0))
    return known


def _reasons(device: torch.device, dtype: torch.dtype, m: int = 1, k: int = 4096,
             group: int = 128) -> dict[str, str | None]:
    reasons = _backend.device_reasons(device)
    if reasons["cuda"] is None:
        if dtype not in _KERNEL_DTYPES:
            reasons["cuda"] = f"x.dtype is {dtype}; the CUDA kernel takes float16/bfloat16 activations"
        elif k % 32 or group % 32:
            reasons["cuda"] = f"the CUDA kernel needs K and the group size to be multiples of 32 (K={k}, group={group})"
    if reasons["triton"] is None:
        if dtype not in _KERNEL_DTYPES:
            reasons["triton"] = (
                f"x.dtype is {dtype}; the Triton kernels take float16/bfloat16 activations "
                f"(float32 runs on backend='torch')"
            )
        elif device.type == "cpu" and dtype == torch.bfloat16:
            reasons["triton"] = "bfloat16 tl.dot gives wrong results in the Triton CPU interpreter"
    return reasons


def _auto_order(m: int, device: torch.device | None = None, k: int = 0, group: int = 0) -> tuple[str, ...]:
    """`group`: consecutive K per group (K for channelwise)."""
    if m <= CUDA_FIRST_MAX_M or (device is not None and (group >= 128 or group == k)
                                 and _wgmma_device(device)):
        return ("cuda", "triton", "torch")
    return ("triton", "cuda", "torch")


def _availability(device: torch.device) -> dict[str, str | None]:
    return _reasons(device, torch.float16)


_backend.register_op(OP, _availability)


def int4_matmul_parts(
    x, packed, scales, zeros, n: int, k: int, group_size: int, bias=None, backend=None,
    who: str = "int4_matmul",
):
    """int4_matmul on the tensors of an Int4Weight (used by Int4Linear, which keeps them as
    buffers). No checks on the weight tensors themselves: Int4Weight/Int4Linear made them."""
    _check(who, x, packed, scales, n, k, bias)
    m = x.numel() // k
    group = effective_group_size(group_size, k)
    choice = _backend.choose(OP, backend, _reasons(x.device, x.dtype, m, k, group),
                             _auto_order(m, x.device, k, group))
    if choice == "torch":
        return int4_matmul_ref_parts(x, packed, scales, zeros, k, group_size, bias)
    op = torch.ops.deepkern.int4_matmul if choice == "cuda" else torch.ops.deepkern_triton.int4_matmul
    y = op(
        as_rows(x), packed, scales, zeros, effective_group_size(group_size, k),
        bias.contiguous() if bias is not None else None,
    )
    return y.view(*x.shape[:-1], n)


def int4_matmul(
    x: torch.Tensor,
    w: Int4Weight,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x @ w.dequantize(x.dtype).T + bias with a 4-bit weight, dequantized in registers.

    Args:
        x: [..., K] float16 or bfloat16 (float32 only with backend="torch"; "auto" picks it
            for float32). Any strides (copied only when there is no [rows, K] view).
        w: an Int4Weight [N, K] on x's device (deepkern.quant.quantize_int4, Int4Linear.weight).
        bias: [N] in x's dtype or float32, or None.
        backend: "auto" | "cuda" | "triton" | "torch" (None: $DEEPKERN_BACKEND or "auto").

    Returns:
        y [..., N] in x's dtype, accumulated in fp32. Differentiable in x and bias; the
        weight is frozen (asking for its gradient raises). An empty batch gives an empty y.
    """
    if not isinstance(w, Int4Weight):
        raise TypeError(
            f"int4_matmul: w must be a deepkern.quant.Int4Weight (see quantize_int4), got {type(w).__name__}"
        )
    return int4_matmul_parts(x, w.packed, w.scales, w.zeros, w.n, w.k, w.group_size, bias, backend)
