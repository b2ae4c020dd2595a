"""INT4 group-quantized weights (W4A16): the format, the quantizer, and Int4Weight.

Layout version 1. A dense weight W [N, K] (N output features, K input features, as in
nn.Linear.weight) is stored as

    packed  int32 [N, ceil(K/8)]  word j of row n holds the codes of W[n, 8j .. 8j+7]:
                                  nibble i (bits 4i .. 4i+3) is q[n, 8j + i], 0..15.
    scales  [G, N]                fp16, bf16 or fp32 (the weight's dtype); G = K / group_size
                                  groups along K (G = 1 for channelwise, group_size=-1).
    zeros   uint8 [G, N] or None  integer zero point 0..15 per (group, row); None means
                                  symmetric: the zero point is 8.

Dequantization, the one definition every backend uses:

    W[n, k] = dtype( float32(q[n, k] - zero[g, n]) * float32(scale[g, n]) ),  g = k // group_size

The fp32 product is exact (a 5-bit integer times a <= 24-bit significand), so the only rounding
is the final one to `dtype`, the activation dtype of the matmul. `Int4Weight.dequantize(dtype)`
returns exactly this tensor and the reference matmul is `x @ w.dequantize(x.dtype).T` in fp32.
The tensor-core kernels build each weight tile this way (bit-identical to dequantize()); the
M=1 kernel applies the scale per 8-code word in fp32 and skips the rounding to `dtype` (see
triton_kernels/int4_matmul.py), which is at least as accurate.

Why this layout (what the Triton kernels read best, and simple enough for the CUDA backend
to repack from once):
- Row-major words along K: a kernel tile of BLOCK_N rows x BLOCK_K columns is BLOCK_N runs of
  BLOCK_K/2 contiguous bytes, read with 16-byte vector loads; the reduction over K stays inside
  each thread for the M=1 kernel.
- 8 consecutive K per word: group sizes are multiples of 8, so every word lies in one group
  and one scale/zero serves the whole word; unpacking is a shift and a mask on the int32.
- scales/zeros as [G, N]: the BLOCK_N scales of one group are one contiguous load.
- Slicing commutes with packing: rows are independent (narrow(0, ...) slices packed rows, a
  contiguous copy of a tensor-parallel output shard), and a group-aligned narrow(1, ...) slices
  whole words and whole groups, so a shard needs no requantization.

Quantizer (round to nearest, min/max rule, per group of `group_size` consecutive K):
- asymmetric: lo = min(min(w), 0), hi = max(max(w), 0); scale = (hi - lo) / 15;
  zero = clamp(round(-lo / scale), 0, 15); q = clamp(round(w / scale) + zero, 0, 15).
  Keeping 0 inside [lo, hi] makes the zero point an integer in 0..15.
- symmetric: scale = max|w| / 7; zero = 8; q = clamp(round(w / scale) + 8, 0, 15) (codes 1..15).
The scale is rounded UP to the scale dtype (so the group's range stays covered) and the codes
are computed from that stored scale: |W - dequantize(float32)| <= scale / 2 for every element.
An all-zero group gets scale 1 and codes = zero. round() is half-to-even.
"""

from __future__ import annotations

import math

import torch

LAYOUT_VERSION = 1
GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SYMMETRIC_ZERO = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of a word at bits 4i..4i+3
_QUANT_ROWS = 4096  # rows quantized per step: bounds the fp32 temporaries on large weights


def effective_group_size(group_size: int, k: int) -> int:
    """The number of consecutive K per group: group_size, or K for channelwise (-1)."""
    return k if group_size == -1 else group_size


def check_group_size(group_size, k: int, who: str = "quantize_int4") -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(
            f"{who}: group_size must be one of {', '.join(map(str, GROUP_SIZES))} (-1: one group "
            f"per row), got {group_size!r}"
        )
    if group_size != -1 and k % group_size != 0:
        raise ValueError(
            f"{who}: K={k} (in_features) is not divisible by group_size={group_size}; use a group "
            f"size that divides K, or group_size=-1 (channelwise)"
        )


# ------------------------------------------------------------------------------------------
# Packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (integers 0..15, any integer dtype) -> packed int32 [N, ceil(K/8)].
    A K that is not a multiple of 8 is padded with code 0. Padding codes (also those left by a
    channelwise narrow along K) are never used: kernels and dequantize() stop at K."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4: q must be 2-D [N, K], got shape {tuple(q.shape)}")
    n, k = q.shape
    kw = (k + 7) // 8
    q64 = q.to(torch.int64)
    if kw * 8 != k:
        q64 = torch.nn.functional.pad(q64, (0, kw * 8 - k))
    words = (q64.view(n, kw, 8) << _SHIFTS.to(q.device, torch.int64)).sum(dim=-1)
    # Bit 31 set (code >= 8 in nibble 7) -> the negative int32 with the same bits.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Packed int32 [N, ceil(K/8)] -> codes uint8 [N, K]."""
    n, kw = packed.shape
    codes = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # arithmetic shift, masked
    return codes.reshape(n, kw * 8)[:, :k].to(torch.uint8)


def dequantize_parts(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The dense weight [N, K] of the format above, in `dtype` (default: the scales' dtype)."""
    g = effective_group_size(group_size, k)
    q = unpack_int4(packed, k).to(torch.float32)  # [N, K]
    s = scales.to(torch.float32).t().repeat_interleave(g, dim=1)  # [N, K]
    if zeros is None:
        z = torch.full((), float(SYMMETRIC_ZERO), device=packed.device)
    else:
        z = zeros.to(torch.float32).t().repeat_interleave(g, dim=1)
    return ((q - z) * s).to(dtype or scales.dtype)


# ------------------------------------------------------------------------------------------
# Quantizer


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x >= 0 (fp32) in `dtype`, rounded up: the smallest value of `dtype` that is >= x."""
    y = x.to(dtype)
    low = y.to(torch.float32) < x
    if bool(low.any()):
        bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
        y = torch.where(low, (y.view(bits) + 1).view(dtype), y)  # next value up (y >= 0)
    return y


def _quantize_rows(w: torch.Tensor, g: int, symmetric: bool, sdtype: torch.dtype):
    """w [n, K] float -> codes uint8 [n, K], scales [K/g, n] sdtype, zeros uint8 [K/g, n] | None."""
    n, k = w.shape
    wg = w.to(torch.float32).view(n, k // g, g)
    if symmetric:
        scale = wg.abs().amax(dim=-1) / 7.0
    else:
        lo = wg.amin(dim=-1).clamp(max=0.0)
        hi = wg.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / 15.0
    scale = _round_up(scale, sdtype).to(torch.float32)  # codes come from the stored scale
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
    if symmetric:
        zero = torch.full_like(scale, float(SYMMETRIC_ZERO))
    else:
        zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    q = q.clamp(0, 15).to(torch.uint8).view(n, k)
    zeros = None if symmetric else zero.to(torch.uint8).t().contiguous()
    return q, scale.to(sdtype).t().contiguous(), zeros


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> "Int4Weight":
    """Quantizes a dense weight [N, K] (nn.Linear layout) to an Int4Weight.

    Args:
        weight: 2-D float tensor (fp16, bf16 or fp32), any device; it is not modified.
        group_size: 32, 64, 128, 256 (consecutive K per group; K must be divisible by it), or
            -1 for one group per output row (channelwise).
        symmetric: zero point fixed at 8 (no zeros tensor) instead of one per group.

    Returns an Int4Weight on weight's device with scales in weight's dtype. The rule is in the
    module docstring; the work runs on weight's device, a few thousand rows at a time.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_int4: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_int4: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.dtype not in SCALE_DTYPES:
        raise TypeError(f"quantize_int4: weight.dtype must be float16, bfloat16 or float32, got {weight.dtype}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"quantize_int4: weight must be non-empty, got shape {tuple(weight.shape)}")
    check_group_size(group_size, k)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("quantize_int4: weight contains NaN or Inf; it cannot be quantized")
    g = effective_group_size(group_size, k)
    packed, scales, zeros = [], [], []
    for r0 in range(0, n, _QUANT_ROWS):
        q, s, z = _quantize_rows(weight[r0 : r0 + _QUANT_ROWS], g, symmetric, weight.dtype)
        packed.append(pack_int4(q))
        scales.append(s)
        zeros.append(z)
    return Int4Weight(
        torch.cat(packed, dim=0),
        torch.cat(scales, dim=1),
        None if symmetric else torch.cat(zeros, dim=1),
        n,
        k,
        group_size,
    )


# ------------------------------------------------------------------------------------------
# Int4Weight


class Int4Weight:
    """A quantized weight [N, K]: `packed`, `scales`, `zeros` (None: symmetric) plus N, K,
    group_size and the layout version (see the module docstring). Immutable by convention;
    frozen for autograd (the kernels give no gradient for it)."""

    __slots__ = ("packed", "scales", "zeros", "n", "k", "group_size", "layout_version")

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        n: int,
        k: int,
        group_size: int,
        layout_version: int = LAYOUT_VERSION,
    ):
        if layout_version != LAYOUT_VERSION:
            raise ValueError(
                f"Int4Weight: layout_version {layout_version} is not supported (this deepkern "
                f"reads version {LAYOUT_VERSION})"
            )
        if not isinstance(n, int) or not isinstance(k, int) or n < 1 or k < 1:
            raise ValueError(f"Int4Weight: N and K must be positive ints, got N={n!r}, K={k!r}")
        check_group_size(group_size, k, "Int4Weight")
        g = effective_group_size(group_size, k)
        groups, kw = k // g, (k + 7) // 8
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or tuple(packed.shape) != (n, kw):
            raise ValueError(
                f"Int4Weight: packed must be an int32 tensor of shape ({n}, {kw}), got "
                f"{_describe(packed)}"
            )
        if not isinstance(scales, torch.Tensor) or scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (groups, n):
            raise ValueError(
                f"Int4Weight: scales must be a float16/bfloat16/float32 tensor of shape "
                f"({groups}, {n}), got {_describe(scales)}"
            )
        if zeros is not None and (
            not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8 or tuple(zeros.shape) != (groups, n)
        ):
            raise ValueError(
                f"Int4Weight: zeros must be None (symmetric) or a uint8 tensor of shape "
                f"({groups}, {n}), got {_describe(zeros)}"
            )
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t is not None and t.device != packed.device:
                raise ValueError(f"Int4Weight: {name} is on {t.device}, packed on {packed.device}")
        self.packed = packed.contiguous()
        self.scales = scales.contiguous()
        self.zeros = zeros.contiguous() if zeros is not None else None
        self.n, self.k, self.group_size = n, k, group_size
        self.layout_version = layout_version

    # -- facts --------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.k))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def dtype(self) -> torch.dtype:
        """The scales' dtype (the default dtype of dequantize())."""
        return self.scales.dtype

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def group_len(self) -> int:
        """Consecutive K per group (K for channelwise)."""
        return effective_group_size(self.group_size, self.k)

    @property
    def num_groups(self) -> int:
        return self.k // self.group_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    # -- conversions --------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] in `dtype` (default: the scales' dtype), exactly as the
        kernels compute with it for activations of that dtype."""
        return dequantize_parts(self.packed, self.scales, self.zeros, self.k, self.group_size, dtype)

    def to(self, *args, **kwargs) -> "Int4Weight":
        """Like Tensor.to: a device moves every tensor; a floating dtype converts the scales
        (rounding them when narrowing, e.g. fp32 -> fp16)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise TypeError(f"Int4Weight.to: dtype must be float16, bfloat16 or float32, got {dtype}")

        def move(t, is_scale=False):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if is_scale else None, non_blocking=non_blocking)

        return Int4Weight(
            move(self.packed), move(self.scales, True), move(self.zeros),
            self.n, self.k, self.group_size, self.layout_version,
        )

    def cuda(self, device=None) -> "Int4Weight":
        if isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to("cuda" if device is None else device)

    def cpu(self) -> "Int4Weight":
        return self.to("cpu")

    def narrow(self, dim: int, start: int, length: int) -> "Int4Weight":
        """The Int4Weight of the dense weight narrowed the same way (no requantization):
        dim 0 (output rows): any range; dim 1 (K): start and length multiples of the group
        size (channelwise: start a multiple of 8). Returns contiguous copies."""
        if dim not in (0, 1, -1, -2):
            raise ValueError(f"Int4Weight.narrow: dim must be 0 or 1, got {dim!r}")
        dim = dim % 2
        size = self.n if dim == 0 else self.k
        if not (isinstance(start, int) and isinstance(length, int)) or start < 0 or length < 1 or start + length > size:
            raise ValueError(
                f"Int4Weight.narrow: need 0 <= start and 1 <= length with start + length <= "
                f"{size} (dim {dim}), got start={start!r}, length={length!r}"
            )
        if dim == 0:
            s = slice(start, start + length)
            return Int4Weight(
                self.packed[s].contiguous(), self.scales[:, s].contiguous(),
                None if self.zeros is None else self.zeros[:, s].contiguous(),
                length, self.k, self.group_size, self.layout_version,
            )
        if self.group_size == -1:
            if start % 8 != 0:
                raise ValueError(
                    f"Int4Weight.narrow: a channelwise weight narrows along K at multiples of 8 "
                    f"(whole words), got start={start}"
                )
            groups = slice(0, 1)
        else:
            g = self.group_size
            if start % g != 0 or length % g != 0:
                raise ValueError(
                    f"Int4Weight.narrow: start and length along K must be multiples of "
                    f"group_size={g}, got start={start}, length={length}"
                )
            groups = slice(start // g, (start + length) // g)
        words = slice(start // 8, (start + length + 7) // 8)
        return Int4Weight(
            self.packed[:, words].contiguous(), self.scales[groups].contiguous(),
            None if self.zeros is None else self.zeros[groups].contiguous(),
            self.n, length, self.group_size, self.layout_version,
        )

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        g = "channelwise" if self.group_size == -1 else f"group_size={self.group_size}"
        return (
            f"Int4Weight(N={self.n}, K={self.k}, {g}, {kind}, scales={self.scales.dtype}, "
            f"device={self.device}, {self.nbytes / 2**20:.2f} MiB, layout v{self.layout_version})"
        )


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} of shape {tuple(t.shape)}"


def int4_nbytes(n: int, k: int, group_size: int, symmetric: bool, scale_bytes: int = 2) -> int:
    """Bytes of an Int4Weight [N, K] without building it (for summaries and benches)."""
    groups = k // effective_group_size(group_size, k)
    return n * math.ceil(k / 8) * 4 + groups * n * (scale_bytes + (0 if symmetric else 1))
