"""deepkern.layernorm_gelu: fused LayerNorm/RMSNorm + GELU with an optional residual add.

Public function -> validation -> backend choice -> one of
    torch.ops.deepkern.layernorm_gelu_fwd / _bwd          (CUDA, csrc/layernorm_gelu/)
    torch.ops.deepkern_triton.layernorm_gelu_fwd / _bwd   (Triton, triton_kernels/layernorm_gelu*.py)
    deepkern.reference.layernorm_gelu_ref                 (torch)
Both kernel backends share the op schema, the fake implementations and the autograd wiring
below; the backward op is an op too, so torch.compile and CUDA graphs see the whole thing.
Eager calls skip the custom-op wrappers (their CPU cost; see "Eager path") and call the same
launchers through one autograd.Function.
"""

from __future__ import annotations

import torch

from deepkern import _backend
from deepkern.ops._layout import as_rows
from deepkern._ext import has_cuda_ext
from deepkern.reference.layernorm_gelu import layernorm_gelu_ref

OP = "layernorm_gelu"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_APPROXIMATE = ("none", "tanh")
_NORMS = ("layernorm", "rmsnorm")


def _triton_launch_fwd(*args):  # triton is imported on first use, not by `import deepkern`
    from deepkern.triton_kernels import layernorm_gelu as kernels

    return kernels.layernorm_gelu_fwd(*args)


def _triton_launch_bwd(*args):
    from deepkern.triton_kernels import layernorm_gelu as kernels

    return kernels.layernorm_gelu_bwd(*args)


# ------------------------------------------------------------------------------------------
# Triton custom ops (same schema as the C++ ones in csrc/registration.cpp)


@torch.library.custom_op("deepkern_triton::layernorm_gelu_fwd", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rmsnorm: bool,
    tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_launch_fwd(x, weight, bias, residual, eps, rmsnorm, tanh)


@torch.library.custom_op("deepkern_triton::layernorm_gelu_bwd", mutates_args=())
def _triton_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rmsnorm: bool,
    tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_launch_bwd(dy, x, weight, bias, mean, rstd, rmsnorm, tanh)


def _fwd_fake(x, weight, bias, residual, eps, rmsnorm, tanh):
    rows, n = x.shape
    h_shape = (rows, n) if residual is not None else (0,)
    return (
        x.new_empty((rows, n)),
        x.new_empty(h_shape),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
    )


def _bwd_fake(dy, x, weight, bias, mean, rstd, rmsnorm, tanh):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    db = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rmsnorm, tanh = inputs
    _, h, mean, rstd = output
    normalized = h if residual is not None else x
    ctx.save_for_backward(normalized, weight, bias, mean, rstd)
    ctx.flags = (rmsnorm, tanh, residual is not None)
    ctx.mark_non_differentiable(mean, rstd)


def _grads(ctx, bwd, dy, dh):
    """(dx, dweight, dbias, dresidual) from the saved tensors; shared by the custom ops'
    autograd and the eager autograd.Function."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    rmsnorm, tanh, has_residual = ctx.flags
    dx, dw, db = bwd(as_rows(dy), x, weight, bias, mean, rstd, rmsnorm, tanh)
    if has_residual and dh is not None:
        dx = dx + dh.reshape(dx.shape)
    return (
        dx,
        dw if weight is not None else None,
        db if bias is not None else None,
        dx if has_residual else None,
    )


def _make_backward(bwd_op):
    def backward(ctx, dy, dh, _dmean, _drstd):
        return (*_grads(ctx, bwd_op, dy, dh), None, None, None)

    return backward


torch.library.register_fake("deepkern_triton::layernorm_gelu_fwd")(_fwd_fake)
torch.library.register_fake("deepkern_triton::layernorm_gelu_bwd")(_bwd_fake)
torch.library.register_autograd(
    "deepkern_triton::layernorm_gelu_fwd",
    _make_backward(torch.ops.deepkern_triton.layernorm_gelu_bwd),
    setup_context=_setup_context,
)
if has_cuda_ext():
    torch.library.register_fake("deepkern::layernorm_gelu_fwd")(_fwd_fake)
    torch.library.register_fake("deepkern::layernorm_gelu_bwd")(_bwd_fake)
    torch.library.register_autograd(
        "deepkern::layernorm_gelu_fwd",
        _make_backward(torch.ops.deepkern.layernorm_gelu_bwd),
        setup_context=_setup_context,
    )


def _fwd_op(backend: str):
    if backend == "cuda":
        return torch.ops.deepkern.layernorm_gelu_fwd
    return torch.ops.deepkern_triton.layernorm_gelu_fwd


# ------------------------------------------------------------------------------------------
# Eager path. On the GPU machine's host, torch.library's custom-op and autograd wrappers cost
# more CPU time than a large call's GPU work (64x1024 bf16, CPU per call: Triton fwd+bwd 1094
# us through the custom op, of which its two launchers take 63 + 117 us; the 16384x8192 GPU
# work is ~590 us), so eager calls use a plain autograd.Function over the same launchers.
# torch.compile traces the custom ops above instead (torch.compiler.is_compiling()).


def _cuda_fwd(*args):
    with torch._C._AutoDispatchBelowAutograd():  # the C++ kernel, no Python autograd wrapper
        return torch.ops.deepkern.layernorm_gelu_fwd.default(*args)


def _cuda_bwd(*args):
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.deepkern.layernorm_gelu_bwd.default(*args)


_EAGER = {"cuda": (_cuda_fwd, _cuda_bwd), "triton": (_triton_launch_fwd, _triton_launch_bwd)}


class _EagerLayerNormGELU(torch.autograd.Function):
    """Same saved tensors and gradients as the custom ops' autograd (_setup_context,
    _make_backward)."""

    @staticmethod
    def forward(ctx, backends, x, weight, bias, residual, eps, rmsnorm, tanh):
        forward, backward = backends  # e.g. Triton's forward with CUDA's backward under "auto"
        y, h, mean, rstd = _EAGER[forward][0](x, weight, bias, residual, eps, rmsnorm, tanh)
        ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
        ctx.backend = backward
        ctx.flags = (rmsnorm, tanh, residual is not None)
        if residual is None:
            ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        return (None, *_grads(ctx, _EAGER[ctx.backend][1], dy, dh), None, None, None)


# ------------------------------------------------------------------------------------------
# Validation and backend choice


def _check(x, weight, bias, eps, approximate, residual, norm):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layernorm_gelu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"layernorm_gelu: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("layernorm_gelu: x must have at least 1 dimension (the normalized one)")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"layernorm_gelu: approximate={approximate!r}: expected 'none' or 'tanh'")
    if norm not in _NORMS:
        raise ValueError(f"layernorm_gelu: norm={norm!r}: expected 'layernorm' or 'rmsnorm'")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layernorm_gelu: eps must be a number > 0, got {eps!r}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"layernorm_gelu: {name} must be a tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != (n,):
            raise ValueError(
                f"layernorm_gelu: {name}.shape must be ({n},) (x's last dim), got {tuple(p.shape)}"
            )
        if p.device != x.device:
            raise ValueError(f"layernorm_gelu: {name} is on {p.device}, x on {x.device}")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"layernorm_gelu: {name}.dtype must be x's dtype ({x.dtype}) or float32, got {p.dtype}"
            )
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(
            f"layernorm_gelu: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}"
        )
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"layernorm_gelu: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(
                f"layernorm_gelu: residual.shape must equal x.shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"layernorm_gelu: residual.dtype must be x's dtype ({x.dtype}), got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"layernorm_gelu: residual is on {residual.device}, x on {x.device}")


def _reasons(device: torch.device, dtype: torch.dtype, n: int) -> dict[str, str | None]:
    reasons = _backend.device_reasons(device)
    if n > 2**31 - 1:
        reasons["cuda"] = reasons["triton"] = f"hidden size {n} exceeds 2**31 - 1"
    return reasons


def _auto_order(n: int, backward: bool, training: bool = False) -> tuple[str, ...]:
    """Preference for the backward kernels, or for the forward's (of a training call when
    `training`); a training call under "auto" may run the forward of one backend and the
    backward of the other (both save the same fp32 mean and rstd)."""
    # Measured on H100, bf16 (scripts/tune_layernorm_gelu.py --defaults, commit bcd720f).
    # Backward: CUDA (its copy-ring kernel: 32768x5120 422 us vs Triton 464; 8192x12288 311
    # vs 425; 4096x65536 854 vs 1184; 32768x4096 294 vs 325), even where Triton's pipelined
    # rows kernel is level or ahead (16384x8192 296 vs 285; 65536x1024 163 vs 164; 65536x2048
    # 297 vs 291): one rule, and within 4% there.
    # Forward: Triton (16384x8192 185 vs 201; 32768x5120 230 vs 255; 8192x12288 142 vs 155),
    # except rows past 40960 (4096x65536: CUDA's cluster-split kernel 508 us, Triton's two-pass
    # loop 539) and, when a backward follows, rows of <= 2048 (65536x1024: 97 vs 104 us, less
    # than the Triton launcher's extra host time per call).
    if backward or (training and n <= 2048):
        return ("cuda", "triton", "torch")
    if n > 40960:
        return ("cuda", "triton", "torch")
    return ("triton", "cuda", "torch")


def _availability(device: torch.device) -> dict[str, str | None]:
    return _reasons(device, torch.bfloat16, 4096)


_backend.register_op(OP, _availability)


def layernorm_gelu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    approximate: str = "none",
    residual: torch.Tensor | None = None,
    norm: str = "layernorm",
    backend: str | None = None,
):
    """y = GELU(norm(h) * weight + bias) over the last dim, h = x (+ residual), in one pass.

    Args:
        x: [..., hidden], float32/float16/bfloat16. Any strides (copied only when the layout
            has no [rows, hidden] view with unit last stride).
        weight, bias: [hidden] in x's dtype or float32 (both the same dtype), or None.
        eps: added to the variance (mean square for rmsnorm); > 0.
        approximate: "none" (exact erf GELU; the kernels evaluate the normal CDF with a
            fitted form, relative error <= 6e-6 for 16-bit outputs and <= 3e-6 in fp32 for
            z >= -6, tails included: scripts/fit_gelu_phi.py) or "tanh".
        residual: optional, x's shape and dtype; then h = x + residual is normalized and
            returned too (rounded to x's dtype), so a pre-norm block keeps its residual stream.
        norm: "layernorm" or "rmsnorm" (no mean subtraction).
        backend: "auto" | "cuda" | "triton" | "torch" (None: $DEEPKERN_BACKEND or "auto").

    Returns:
        y with x's shape and dtype; (y, h) when residual is given. Differentiable in x,
        weight, bias and residual; statistics and reductions run in fp32.
    """
    _check(x, weight, bias, eps, approximate, residual, norm)
    n = x.shape[-1]
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual)
    )
    reasons = _reasons(x.device, x.dtype, n)
    backward = _backend.choose(OP, backend, reasons, _auto_order(n, True)) if training else None
    choice = _backend.choose(OP, backend, reasons, _auto_order(n, False, training))
    if choice == "torch" or backward == "torch" or x.numel() == 0:
        return layernorm_gelu_ref(x, weight, bias, eps, approximate, residual, norm)
    shape = x.shape
    args = (
        as_rows(x),
        weight.contiguous() if weight is not None else None,
        bias.contiguous() if bias is not None else None,
        as_rows(residual) if residual is not None else None,
        float(eps),
        norm == "rmsnorm",
        approximate == "tanh",
    )
    if torch.compiler.is_compiling():
        y, h, _, _ = _fwd_op(backward or choice)(*args)  # the custom op's backward is its own
    elif training:
        y, h = _EagerLayerNormGELU.apply((choice, backward), *args)
    else:
        y, h, _, _ = _EAGER[choice][0](*args)
    y = y.view(shape)
    return y if residual is None else (y, h.view(shape))
