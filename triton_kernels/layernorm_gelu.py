"""Triton kernels for fused LayerNorm/RMSNorm + GELU and their launchers: the forward here, the
backward in layernorm_gelu_bwd.py (re-exported), the shared GELU math in layernorm_gelu_common.py.

Row statistics multiply by inv_n = 1/n computed on the host: Triton's `/` on fp32 is an
approximate division, and e.g. a 1-element row must give x - mean == 0 exactly. (n is also
passed: Triton specializes an int argument equal to 1 into a constant.)

Same contract as the CUDA op (csrc/layernorm_gelu/): x is 2-D [rows, hidden] with a unit last
stride; outputs are contiguous; mean/rstd are fp32 [rows] (mean is 0 for rmsnorm).

Paths:
- rows up to MAX_ROW_BLOCK_FWD (bwd: MAX_ONE_BLOCK_BWD) elements: one program per row (forward)
  or per group of rows (backward, persistent, weight-gradient sums kept in registers), the row
  held as a single block.
- widths a power-of-two block would leave >1/8 empty (5120, 12288, ...; up to 16384): the
  forward holds the row as 3-8 power-of-two chunks in registers (_fwd_chunks_kernel). The
  backward holds any width that is not a power of two as two power-of-two chunks (5120 = 4096
  + 1024; _bwd_row_blocks), up to MAX_ROW_BLOCK_BWD together.
- longer rows: the forward loops over the row twice (statistics by Chan's merge of per-chunk
  moments, then normalize+GELU, re-reading mostly from L2); the backward computes per-row
  statistics first, then a column-tiled kernel writes dx and weight-gradient partials.
dweight/dbias are fp32 per-program partials summed by _sum_partials in a fixed order, so they
have the same bits run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepkern._backend import on_device

from ._launch import launch
from .layernorm_gelu_bwd import _bwd_row_blocks, layernorm_gelu_bwd  # noqa: F401  (re-exported)
from .layernorm_gelu_common import _affine_gelu

MAX_ROW_BLOCK_FWD = 32768


@triton.jit
def _fwd_row_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    N, stride_x, stride_r, eps, inv_n,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    RMS: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * N + cols, h, mask=mask)
        x = h.to(tl.float32)
    if RMS:
        xc = x
        tl.store(Mean + row, 0.0)
    else:
        mean = tl.sum(x, axis=0) * inv_n
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) * inv_n + eps)
    tl.store(Rstd + row, rstd)
    y = _affine_gelu(xc * rstd, W, B, cols, mask, HAS_W, HAS_B, TANH, WIDE, FAST)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _widen(x, BF16: tl.constexpr, FAST: tl.constexpr):
    """16-bit x as fp32. FAST (compiled for the GPU): through a non-pure inline asm, so the
    compiler cannot merge the conversions of different phases into one fp32 copy of the row
    (65536 fp32 per row do not fit in registers); the interpreter converts plainly."""
    if FAST:
        if BF16:
            return tl.inline_asm_elementwise("cvt.f32.bf16 $0, $1;", "=r,h", [x],
                                             dtype=tl.float32, is_pure=False, pack=1)
        else:
            return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x],
                                             dtype=tl.float32, is_pure=False, pack=1)
    else:
        return x.to(tl.float32)


@triton.jit
def _chunk_in(X, R, H, row, N, stride_x, stride_r, k: tl.constexpr,
              HAS_RES: tl.constexpr, LOW: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    """Chunk k of the row (h = x + residual stored when HAS_RES), as fp32, or in x's 16-bit
    type when LOW; zeros for k >= NCHUNK (never loaded: the compiler drops them)."""
    if k < NCHUNK:
        cols = k * CHUNK + tl.arange(0, CHUNK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * N + cols, x, mask=mask)
        if LOW:
            return x
        else:
            return x.to(tl.float32)
    else:
        if LOW:
            return tl.zeros([CHUNK], dtype=X.dtype.element_ty)
        else:
            return tl.zeros([CHUNK], dtype=tl.float32)


@triton.jit
def _chunk_f32(x, LOW: tl.constexpr, BF16: tl.constexpr, FAST: tl.constexpr):
    if LOW:
        return _widen(x, BF16, FAST)
    else:
        return x


@triton.jit
def _chunk_out(x, W, B, Y, row, N, mean, rstd, k: tl.constexpr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr,
               FAST: tl.constexpr, LOW: tl.constexpr, BF16: tl.constexpr,
               CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    if k < NCHUNK:
        cols = k * CHUNK + tl.arange(0, CHUNK)
        mask = cols < N
        xhat = (_chunk_f32(x, LOW, BF16, FAST) - mean) * rstd
        y = _affine_gelu(xhat, W, B, cols, mask, HAS_W, HAS_B, TANH, WIDE, FAST)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_sum(acc, x, k: tl.constexpr, LOW: tl.constexpr, BF16: tl.constexpr, FAST: tl.constexpr,
               NCHUNK: tl.constexpr):
    if k < NCHUNK:
        return acc + _chunk_f32(x, LOW, BF16, FAST)
    else:
        return acc


@triton.jit
def _chunk_sq(acc, x, mean, N, k: tl.constexpr, LOW: tl.constexpr, BF16: tl.constexpr,
              FAST: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    if k < NCHUNK:
        cols = k * CHUNK + tl.arange(0, CHUNK)
        d = tl.where(cols < N, _chunk_f32(x, LOW, BF16, FAST) - mean, 0.0)
        return acc + d * d
    else:
        return acc


@triton.jit
def _fwd_chunks_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    N, stride_x, stride_r, eps, inv_n,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    RMS: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr,
    LOW: tl.constexpr, BF16: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr,
):
    """The row in registers as NCHUNK (<= 8) power-of-two chunks: widths like 5120 = 5 x 1024
    or 12288 = 3 x 4096 without a padded power-of-two block (wasted lanes cost instructions)
    or a second pass over the row (the looped kernel). LOW (16-bit x, rows up to 65536): the
    chunks stay in x's type and are widened again in each phase (65536 fp32 per row do not
    fit in registers); the sums run chunk by chunk so only one chunk is fp32 at a time."""
    row = tl.program_id(0).to(tl.int64)
    x0 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 0, HAS_RES, LOW, CHUNK, NCHUNK)
    x1 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 1, HAS_RES, LOW, CHUNK, NCHUNK)
    x2 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 2, HAS_RES, LOW, CHUNK, NCHUNK)
    x3 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 3, HAS_RES, LOW, CHUNK, NCHUNK)
    x4 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 4, HAS_RES, LOW, CHUNK, NCHUNK)
    x5 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 5, HAS_RES, LOW, CHUNK, NCHUNK)
    x6 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 6, HAS_RES, LOW, CHUNK, NCHUNK)
    x7 = _chunk_in(X, R, H, row, N, stride_x, stride_r, 7, HAS_RES, LOW, CHUNK, NCHUNK)
    if RMS:
        mean = 0.0
    else:
        acc = _chunk_f32(x0, LOW, BF16, FAST)
        acc = _chunk_sum(acc, x1, 1, LOW, BF16, FAST, NCHUNK)
        acc = _chunk_sum(acc, x2, 2, LOW, BF16, FAST, NCHUNK)
        acc = _chunk_sum(acc, x3, 3, LOW, BF16, FAST, NCHUNK)
        acc = _chunk_sum(acc, x4, 4, LOW, BF16, FAST, NCHUNK)
        acc = _chunk_sum(acc, x5, 5, LOW, BF16, FAST, NCHUNK)
        acc = _chunk_sum(acc, x6, 6, LOW, BF16, FAST, NCHUNK)
        acc = _chunk_sum(acc, x7, 7, LOW, BF16, FAST, NCHUNK)
        mean = tl.sum(acc, axis=0) * inv_n
    sq = _chunk_sq(tl.zeros([CHUNK], dtype=tl.float32), x0, mean, N, 0, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x1, mean, N, 1, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x2, mean, N, 2, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x3, mean, N, 3, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x4, mean, N, 4, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x5, mean, N, 5, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x6, mean, N, 6, LOW, BF16, FAST, CHUNK, NCHUNK)
    sq = _chunk_sq(sq, x7, mean, N, 7, LOW, BF16, FAST, CHUNK, NCHUNK)
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) * inv_n + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    _chunk_out(x0, W, B, Y, row, N, mean, rstd, 0, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x1, W, B, Y, row, N, mean, rstd, 1, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x2, W, B, Y, row, N, mean, rstd, 2, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x3, W, B, Y, row, N, mean, rstd, 3, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x4, W, B, Y, row, N, mean, rstd, 4, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x5, W, B, Y, row, N, mean, rstd, 5, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x6, W, B, Y, row, N, mean, rstd, 6, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)
    _chunk_out(x7, W, B, Y, row, N, mean, rstd, 7, HAS_W, HAS_B, TANH, WIDE, FAST, LOW, BF16, CHUNK, NCHUNK)


@triton.jit
def _fwd_loop_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    N, stride_x, stride_r, eps, inv_n,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    RMS: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per row. (Persistent programs, a few per SM so that pass 2 re-reads from L2,
    # measured slower: 4096x65536 bf16 815 us vs 570 us, fewer loads in flight.)
    # Pass 2 walks the chunks last to first, so it starts on those pass 1 loaded last (the
    # likeliest still in L2), and x is loaded evict_last in pass 1, evict_first in pass 2, y
    # stored streaming (.cs). H100 bf16, same bits: 4096x65536 493 vs 580 us, 2048x131072 525
    # vs 637, 8192x49152 698 vs 873 (reverse order alone: 500 / 531 / 728; hints alone: 578 /
    # 592 / 858; .dev/ln_loop_ab.py).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    h_row = H + row * N
    # Pass 1: merge per-chunk (count, mean, M2) with Chan's formula (rmsnorm: sum of squares).
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(h_row + cols, h, mask=mask)
            x = h.to(tl.float32)
        n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        if RMS:
            m2 += tl.sum(x * x, axis=0)
        else:
            c_mean = tl.sum(x, axis=0) / n_chunk
            d = tl.where(mask, x - c_mean, 0.0)
            c_m2 = tl.sum(d * d, axis=0)
            total = count + n_chunk
            delta = c_mean - mean
            mean += delta * (n_chunk / total)
            m2 += c_m2 + delta * delta * count * (n_chunk / total)
        count += n_chunk
    if RMS:
        mean = 0.0
    rstd = 1.0 / tl.sqrt(m2 * inv_n + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    # Pass 2: re-read (h when a residual was added; the chunks are likely still in L2).
    n_chunks = tl.cdiv(N, BLOCK_N)
    for c in range(0, n_chunks):
        cols = (n_chunks - 1 - c) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_RES:
            x = tl.load(h_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        y = _affine_gelu((x - mean) * rstd, W, B, cols, mask, HAS_W, HAS_B, TANH, WIDE, FAST)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask, cache_modifier=".cs")


# ------------------------------------------------------------------------------------------
# Launchers


def _loop_chunk(n: int) -> int:
    """The largest power of two <= 4096 that divides n (at least 512): no padded chunks."""
    chunk = 4096
    while chunk > 512 and n % chunk:
        chunk //= 2
    return chunk


def _register_chunk(n: int, low: bool) -> int:
    """Chunk of _fwd_chunks_kernel for a row width that a power-of-two block would pad, or
    that is too long for fp32 registers (> 16384; 16-bit x only, held in 16 bits: `low`):
    the largest power of two <= 4096 (8192 for long rows) splitting n into <= 8 chunks with
    the last one at least 7/8 full; 0 when none does or the row is too long.
    H100 bf16, 16-bit chunks against the two-pass loop: 4096x40000 280 us vs 352, but
    4096x65536 649 vs 559 (one row fills half the register file, so an SM cannot overlap one
    row's loads with another's math), hence up to 5 chunks of 8192 only."""
    if n > (40960 if low else 16384):
        return 0
    chunk = 8192 if n > 16384 else 4096
    while chunk >= 256:
        nchunk = triton.cdiv(n, chunk)
        if nchunk <= 8 and n - (nchunk - 1) * chunk >= chunk * 7 // 8:
            return chunk
        chunk //= 2
    return 0


def _row_warps(block_n: int) -> int:
    # H100, 16384x8192 bf16 forward: 8 warps 244 us, 16 warps 264 us, 4 warps 298 us.
    return max(1, min(16, block_n // 1024))


def layernorm_gelu_fwd(x, weight, bias, residual, eps: float, rmsnorm: bool, tanh: bool,
                       config: dict | None = None):
    """`config` overrides the launch choices (num_warps, block) for tuning sweeps."""
    with on_device(x.device):
        return _fwd(x, weight, bias, residual, eps, rmsnorm, tanh, config or {})


def _fwd(x, weight, bias, residual, eps: float, rmsnorm: bool, tanh: bool, config: dict):
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    h = torch.empty((rows, n) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, h, mean, rstd
    dummy = x
    args = (
        x, residual if residual is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        y, h if residual is not None else dummy, mean, rstd,
        n, x.stride(0), residual.stride(0) if residual is not None else 0, eps, 1.0 / n,
    )
    flags = dict(
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
        RMS=rmsnorm, TANH=tanh, WIDE=x.dtype == torch.float32, FAST=x.is_cuda,
    )
    block_n = triton.next_power_of_2(n)
    # One block per row when the row fills it; rows that would leave a padded block more than
    # ~1/8 empty loop over exact chunks instead (H100 bf16: 32768x5120 row block 471 us, chunks
    # of 1024 367 us; 8192x12288: 354 us vs chunks of 4096 213 us).
    padded = block_n > n * 9 // 8 and n > 2048
    low_ok = x.dtype != torch.float32
    chunk = config.get("chunk", _register_chunk(n, low_ok))
    if block_n <= config.get("max_row_block", MAX_ROW_BLOCK_FWD) and not padded:
        launch(_fwd_row_kernel, (rows,), args, dict(flags, BLOCK_N=block_n),
               num_warps=config.get("num_warps", _row_warps(block_n)))
    elif chunk:
        nchunk = triton.cdiv(n, chunk)
        if nchunk > 8:
            raise ValueError(f"layernorm_gelu_fwd: chunk {chunk} splits {n} into {nchunk} > 8 chunks")
        low = n > 16384
        if low and not low_ok:
            raise ValueError(f"layernorm_gelu_fwd: rows of {n} fp32 elements do not fit in registers")
        # H100 bf16: 8192x12288 (3 x 4096) 8 warps 142 us, 16 warps 154; 32768x5120 (5 x 1024)
        # 4 or 8 warps 230-233 us.
        warps = 16 if chunk >= 8192 else 8 if chunk >= 2048 else 4
        launch(_fwd_chunks_kernel, (rows,), args,
               dict(flags, LOW=low, BF16=x.dtype == torch.bfloat16, CHUNK=chunk, NCHUNK=nchunk),
               num_warps=config.get("num_warps", warps))
    else:
        block = _loop_chunk(n)
        warps = 4 if block <= 1024 else 8
        if n % 16384 == 0:  # H100 4096x65536 bf16: 16384 x 32 warps 540 us, 4096 x 8 569
            # (before the reversed pass 2; with it, 8192 x 16 warps: 499 vs 493)
            block, warps = 16384, 32
        block = config.get("block", block)
        launch(_fwd_loop_kernel, (rows,), args, dict(flags, BLOCK_N=block),
               num_warps=config.get("num_warps", warps))
    return y, h, mean, rstd
