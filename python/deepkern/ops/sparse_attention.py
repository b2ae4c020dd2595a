"""deepkern.sparse_attention and deepkern.select_blocks: block-sparse top-k attention.

Public functions -> validation -> backend choice -> one of
    torch.ops.deepkern_triton.select_blocks / sparse_attention_fwd / _bwd
        (Triton: triton_kernels/sparse_attention_select.py, triton_kernels/sparse_attention.py)
    deepkern.reference.sparse_attention (torch; any device, dtype float16/bfloat16/float32)
The CUDA C++ kernels are issue 5's part 2. Semantics (selection rules, ties, rows without
keys) are documented in deepkern/reference/sparse_attention.py.
"""

from __future__ import annotations

import math

import torch

from deepkern import _backend
from deepkern.reference.sparse_attention import (
    clean_indices,
    num_blocks,
    select_blocks_ref,
    sparse_attention_ref,
)

OP = "sparse_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_HEAD_DIMS = (64, 128)
BLOCK_SIZES = (32, 64, 128)
MAX_KERNEL_TOPK = 64  # the selection kernel keeps each row's running top-k in registers
_CUDA_REASON = "the CUDA kernels are not implemented yet (issue 5's part 2)"


# ------------------------------------------------------------------------------------------
# Triton custom ops


@torch.library.custom_op("deepkern_triton::select_blocks", mutates_args=())
def _triton_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    topk: int,
    sink_blocks: int,
    local_blocks: int,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    from deepkern.triton_kernels import sparse_attention_select as kernels

    with _backend.on_device(q.device):
        return kernels.select_blocks(q, k, block_size, topk, sink_blocks, local_blocks, causal,
                                     softmax_scale)


@torch.library.custom_op("deepkern_triton::sparse_attention_fwd", mutates_args=())
def _triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from deepkern.triton_kernels import sparse_attention as kernels

    with _backend.on_device(q.device):
        return kernels.sparse_attention_fwd(q, k, v, indices, block_size, causal, softmax_scale)


@torch.library.custom_op("deepkern_triton::sparse_attention_bwd", mutates_args=())
def _triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    block_size: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from deepkern.triton_kernels import sparse_attention as kernels

    with _backend.on_device(q.device):
        return kernels.sparse_attention_bwd(dout, q, k, v, out, lse, indices, block_size, causal,
                                            softmax_scale)


@torch.library.register_fake("deepkern_triton::select_blocks")
def _select_fake(q, k, block_size, topk, sink_blocks, local_blocks, causal, softmax_scale):
    B, S = q.shape[:2]
    width = sink_blocks + local_blocks + topk
    return q.new_empty((B, k.shape[2], num_blocks(S, block_size), width), dtype=torch.int32)


@torch.library.register_fake("deepkern_triton::sparse_attention_fwd")
def _fwd_fake(q, k, v, indices, block_size, causal, softmax_scale):
    B, S, Hq, D = q.shape
    return q.new_empty((B, S, Hq, D)), q.new_empty((B, S, Hq), dtype=torch.float32)


@torch.library.register_fake("deepkern_triton::sparse_attention_bwd")
def _bwd_fake(dout, q, k, v, out, lse, indices, block_size, causal, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, block_size, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.args = (block_size, causal, softmax_scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, indices = ctx.saved_tensors
    dq, dk, dv = torch.ops.deepkern_triton.sparse_attention_bwd(
        dout, q, k, v, out, lse, indices, *ctx.args
    )
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd(
    "deepkern_triton::sparse_attention_fwd", _backward, setup_context=_setup_context
)


# ------------------------------------------------------------------------------------------
# Validation and backend choice


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{OP}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{OP}: {name} must be >= {minimum}, got {value}")


def _check_tensor(name: str, t, ref_name: str | None = None, ref=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{OP}: {name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}"
        )
    if t.dtype not in _DTYPES:
        raise TypeError(f"{OP}: {name}.dtype must be float16, bfloat16 or float32, got {t.dtype}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{OP}: {name}.dtype ({t.dtype}) must equal {ref_name}.dtype ({ref.dtype})")
        if t.device != ref.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, {ref_name} on {ref.device}")


def _check(q, k, v, block_size, topk, sink_blocks, local_blocks, causal, softmax_scale):
    _check_tensor("q", q)
    _check_tensor("k", k, "q", q)
    B, S, Hq, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
        raise ValueError(
            f"{OP}: k.shape {tuple(k.shape)} must be [batch={B}, seq={S}, kv_heads, head_dim={D}] "
            f"to match q.shape {tuple(q.shape)}"
        )
    if v is not None:
        _check_tensor("v", v, "q", q)
        if v.shape != k.shape:
            raise ValueError(f"{OP}: v.shape {tuple(v.shape)} must equal k.shape {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hq < 1 or Hkv < 1 or D < 1:
        raise ValueError(f"{OP}: heads and head_dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{OP}: q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{OP}: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    _check_int("topk", topk, 0)
    _check_int("sink_blocks", sink_blocks, 0)
    # Block i itself is always kept and takes one local slot, so rows are never empty.
    _check_int("local_blocks", local_blocks, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and (
        isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
        or not math.isfinite(softmax_scale) or softmax_scale <= 0
    ):
        raise ValueError(f"{OP}: softmax_scale must be None or a finite number > 0, got {softmax_scale!r}")


def _check_indices(indices, q, k, block_size):
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{OP}: indices must be a torch.Tensor or None, got {type(indices).__name__}")
    if indices.dtype != torch.int32:
        raise TypeError(f"{OP}: indices.dtype must be torch.int32, got {indices.dtype}")
    B, S = q.shape[:2]
    nb = num_blocks(S, block_size)
    expected = (B, k.shape[2], nb)
    if indices.dim() != 4 or tuple(indices.shape[:3]) != expected or indices.shape[3] < 1:
        raise ValueError(
            f"{OP}: indices.shape must be [batch={B}, kv_heads={k.shape[2]}, blocks={nb}, width>=1] "
            f"(blocks = ceil(seq / block_size)), got {tuple(indices.shape)}"
        )
    if indices.device != q.device:
        raise ValueError(f"{OP}: indices is on {indices.device}, q on {q.device}")
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return  # value checks need a device sync; the kernels clamp ids, so no bad access
    out_of_range = ((indices < -1) | (indices >= nb)).any()
    ordered = indices.sort(dim=-1).values
    duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()
    if bool(out_of_range):
        raise ValueError(
            f"{OP}: indices values must be block ids in [0, {nb}) or -1 (none), got values in "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    if bool(duplicate):
        raise ValueError(f"{OP}: indices rows must not repeat a block id (-1 aside)")


def _reasons(device, dtype, head_dim: int, topk: int, select: bool) -> dict[str, str | None]:
    reasons = _backend.device_reasons(device)
    reasons["cuda"] = _CUDA_REASON
    if reasons["triton"] is None:
        if dtype not in _KERNEL_DTYPES:
            reasons["triton"] = f"dtype {dtype}: the kernels take float16 or bfloat16 (float32: backend='torch')"
        elif head_dim not in _KERNEL_HEAD_DIMS:
            reasons["triton"] = f"head_dim {head_dim}: the kernels take 64 or 128"
        elif select and topk > MAX_KERNEL_TOPK:
            reasons["triton"] = f"topk={topk} > {MAX_KERNEL_TOPK}, the selection kernel's limit"
    return reasons


def _availability(device: torch.device) -> dict[str, str | None]:
    return _reasons(device, torch.bfloat16, 128, 16, True)


_backend.register_op(OP, _availability)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale(softmax_scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 64,
    topk: int = 16,
    sink_blocks: int = 1,
    local_blocks: int = 2,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The key blocks each query block attends to, as sparse_attention selects them.

    Returns int32 [B, Hkv, ceil(S / block_size), sink_blocks + local_blocks + topk]: per
    (batch, kv head, query block) the kept block ids ascending, then -1. Not differentiable.
    Arguments as in sparse_attention.
    """
    _check(q, k, None, block_size, topk, sink_blocks, local_blocks, causal, softmax_scale)
    scale = _scale(softmax_scale, q.shape[3])
    choice = _backend.choose(OP, backend, _reasons(q.device, q.dtype, q.shape[3], topk, True),
                             ("cuda", "triton", "torch"))
    if choice == "torch" or q.numel() == 0:
        with torch.no_grad():
            return select_blocks_ref(q, k, block_size, topk, sink_blocks, local_blocks, causal, scale)
    return torch.ops.deepkern_triton.select_blocks(
        _unit_last_stride(q.detach()), _unit_last_stride(k.detach()), block_size, topk,
        sink_blocks, local_blocks, causal, scale,
    )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 64,
    topk: int = 16,
    sink_blocks: int = 1,
    local_blocks: int = 2,
    causal: bool = True,
    softmax_scale: float | None = None,
    indices: torch.Tensor | None = None,
    return_indices: bool = False,
    backend: str | None = None,
):
    """Block-sparse attention: each query block attends to its sink blocks, its local window
    and its `topk` best key blocks by a pooled (mean q . mean k) score; exact softmax over them.

    Args:
        q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv (GQA/MQA). float16 or
            bfloat16 (float32: backend="torch" only); D in {64, 128} for the kernels. Any
            strides (copied only when the last one is not 1).
        block_size: tokens per block, 32, 64 or 128; the last block may be partial.
        topk: blocks chosen by score per query block, >= 0 (the kernel selects up to 64).
        sink_blocks: first blocks always kept, >= 0.
        local_blocks: causal: the blocks i - local_blocks + 1 .. i are always kept; >= 1.
            Non-causal: block i is always kept and local_blocks only sizes the index rows.
        causal: causal mask (key position <= query position).
        softmax_scale: score scale, default 1 / sqrt(D).
        indices: optional int32 [B, Hkv, ceil(S / block_size), W] of block ids, -1 = none
            (any order, no repeats); then no selection runs and topk/sink/local are unused.
            In causal mode entries j > i add nothing.
        return_indices: also return the indices used (int32 [B, Hkv, nb, W]).
        backend: "auto" | "triton" | "torch" | "cuda" (None: $DEEPKERN_BACKEND or "auto").

    Returns:
        out [B, S, Hq, D] in q's dtype (and the indices when return_indices=True).
        Differentiable in q, k and v for the given selection (which is not differentiated);
        the backward is deterministic. Its Triton kernels use, besides dq/dk/dv, O(B * S * Hq)
        fp32 for delta, O(B * Hkv * nb * W) int32/int64 for the transposed index lists, and
        up to 512 x 2 x block_size x D fp32 partial sums (32 MB at block 64, D 128) for the
        long key-block lists (the sink blocks'), which run split across programs.
    """
    _check(q, k, v, block_size, topk, sink_blocks, local_blocks, causal, softmax_scale)
    if indices is not None:
        _check_indices(indices, q, k, block_size)
    if not isinstance(return_indices, bool):
        raise TypeError(f"{OP}: return_indices must be a bool, got {type(return_indices).__name__}")
    D = q.shape[3]
    scale = _scale(softmax_scale, D)
    reasons = _reasons(q.device, q.dtype, D, topk, indices is None)
    choice = _backend.choose(OP, backend, reasons, ("cuda", "triton", "torch"))
    if choice == "torch" or q.numel() == 0:
        idx = indices
        if idx is None:
            with torch.no_grad():
                idx = select_blocks_ref(q, k, block_size, topk, sink_blocks, local_blocks, causal, scale)
        out = sparse_attention_ref(q, k, v, idx, block_size, causal, scale)
        return (out, idx) if return_indices else out
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    if indices is None:
        idx = torch.ops.deepkern_triton.select_blocks(
            q.detach(), k.detach(), block_size, topk, sink_blocks, local_blocks, causal, scale
        )
        kernel_idx = idx
    else:
        idx = indices
        kernel_idx = clean_indices(indices, causal)
    out, _ = torch.ops.deepkern_triton.sparse_attention_fwd(q, k, v, kernel_idx, block_size,
                                                            causal, scale)
    return (out, idx) if return_indices else out
