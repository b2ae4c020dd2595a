"""Triton kernels for fused LayerNorm/RMSNorm + GELU (forward and backward) and their launchers.

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

import functools

import torch
import triton
import triton.language as tl

from deepkern._backend import on_device

from ._launch import launch

MAX_ROW_BLOCK_FWD = 32768
# Backward in registers: one row block up to MAX_ONE_BLOCK_BWD (above, it spills: x, dy, w, b,
# dw, db per element; H100 8192x12288 bf16 as one 16384 block 1851 us, the two-kernel path
# wins); two chunks up to MAX_ROW_BLOCK_BWD together (12288 = 8192 + 4096).
MAX_ONE_BLOCK_BWD = 8192
MAX_ROW_BLOCK_BWD = 16384
LOOP_BLOCK = 4096  # chunk of the looped kernels
TILE_COLS = 1024  # column tile of the looped backward

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
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
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
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_RES:
            x = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = _affine_gelu((x - mean) * rstd, W, B, cols, mask, HAS_W, HAS_B, TANH, WIDE, FAST)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_params(W, B, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """weight and bias over one chunk of columns, as fp32 (1 and 0 when absent)."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32) if HAS_B else 0.0
    return w, b


@triton.jit
def _bwd_fetch(P, row, stride, n_rows, cols, mask):
    """One chunk of row `row` of P (zeros past the last row: the prefetch runs one row ahead)."""
    return tl.load(P + row * stride + cols, mask=mask & (row < n_rows), other=0.0)


@triton.jit
def _bwd_grads(x, dy, w, b, mask, mean, rstd, dw, db,
               TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr):
    """One chunk of a row (x, dy in fp32): (xhat, dxhat, dw, db) with the gradient dz at the
    GELU's input added into the weight/bias gradient sums dw += dz * xhat, db += dz."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dz = dy * _gelu_grad(xhat * w + b, TANH, WIDE, FAST)
    dw += dz * xhat
    db += dz
    return xhat, dz * w, dw, db


@triton.jit
def _bwd_sums(dxhat, xhat, RMS: tl.constexpr):
    """One chunk's row sums: sum(dxhat * xhat) (RMS), else [sum(dxhat), sum(dxhat * xhat)],
    both in one reduction (one barrier round instead of two)."""
    if RMS:
        return tl.sum(dxhat * xhat, axis=0)
    else:
        return tl.sum(tl.join(dxhat, dxhat * xhat), axis=0)


@triton.jit
def _bwd_store_dx(DX, row, N, cols, mask, dxhat, xhat, rstd, c1, c2, RMS: tl.constexpr):
    if RMS:
        dx = rstd * (dxhat - xhat * c2)
    else:
        dx = rstd * (dxhat - c1 - xhat * c2)
    tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows_kernel(
    DY, X, W, B, Mean, Rstd, DX, DWp, DBp,
    n_rows, N, stride_dy, stride_x, inv_n,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
):
    """Persistent programs over rows; a row in registers as chunk A = columns [0, BLOCK_A) and,
    when BLOCK_B > 0, chunk B = [BLOCK_A, BLOCK_A + BLOCK_B), both masked by cols < N (5120 =
    4096 + 1024: a padded 8192 block's masked lanes would still run the GELU-gradient math).
    `if BLOCK_B > 0` is resolved at compile time: with BLOCK_B = 0, the one-block kernel."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_A)
    mask = cols < N
    w, b = _bwd_params(W, B, cols, mask, HAS_W, HAS_B)
    dw = tl.zeros([BLOCK_A], dtype=tl.float32)
    db = tl.zeros([BLOCK_A], dtype=tl.float32)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = cols_b < N
        w_b, b_b = _bwd_params(W, B, cols_b, mask_b, HAS_W, HAS_B)
        dw_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        db_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    # PREFETCH: the next row's x and dy are loaded before this row is computed and reduced, so
    # a program keeps its loads in flight through its own reductions.
    if PREFETCH:
        first = tl.cast(pid, tl.int64)
        x_next = _bwd_fetch(X, first, stride_x, n_rows, cols, mask)
        dy_next = _bwd_fetch(DY, first, stride_dy, n_rows, cols, mask)
        if BLOCK_B > 0:
            x_next_b = _bwd_fetch(X, first, stride_x, n_rows, cols_b, mask_b)
            dy_next_b = _bwd_fetch(DY, first, stride_dy, n_rows, cols_b, mask_b)
    # STAGES > 1: Triton's pipeliner copies the loads of the rows STAGES - 1 steps ahead into
    # shared memory (cp.async), as the CUDA backward's copy ring does, instead of PREFETCH's
    # registers.
    for row in tl.range(pid, n_rows, step, num_stages=STAGES):
        row64 = tl.cast(row, tl.int64)
        if PREFETCH:
            x_raw = x_next
            dy_raw = dy_next
            nxt = row64 + step
            x_next = _bwd_fetch(X, nxt, stride_x, n_rows, cols, mask)
            dy_next = _bwd_fetch(DY, nxt, stride_dy, n_rows, cols, mask)
            if BLOCK_B > 0:
                x_raw_b = x_next_b
                dy_raw_b = dy_next_b
                x_next_b = _bwd_fetch(X, nxt, stride_x, n_rows, cols_b, mask_b)
                dy_next_b = _bwd_fetch(DY, nxt, stride_dy, n_rows, cols_b, mask_b)
        else:
            x_raw = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0)
            dy_raw = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0)
            if BLOCK_B > 0:
                x_raw_b = tl.load(X + row64 * stride_x + cols_b, mask=mask_b, other=0.0)
                dy_raw_b = tl.load(DY + row64 * stride_dy + cols_b, mask=mask_b, other=0.0)
        x = x_raw.to(tl.float32)  # before the statistics' loads: the one-block kernel's order
        dy = dy_raw.to(tl.float32)
        if STAGES > 1:  # as 1-element tensors, which the pipeliner copies ahead too
            one = tl.arange(0, 1)
            rstd = tl.sum(tl.load(Rstd + row + one), axis=0)
            mean = tl.sum(tl.load(Mean + row + one), axis=0)
        else:
            rstd = tl.load(Rstd + row)
            mean = tl.load(Mean + row)
        xhat, dxhat, dw, db = _bwd_grads(x, dy, w, b, mask, mean, rstd, dw, db, TANH, WIDE, FAST)
        sums = _bwd_sums(dxhat, xhat, RMS)
        if BLOCK_B > 0:
            xhat_b, dxhat_b, dw_b, db_b = _bwd_grads(
                x_raw_b.to(tl.float32), dy_raw_b.to(tl.float32), w_b, b_b, mask_b, mean, rstd,
                dw_b, db_b, TANH, WIDE, FAST)
            sums += _bwd_sums(dxhat_b, xhat_b, RMS)  # over the whole row
        if RMS:
            c1 = 0.0
            c2 = sums * inv_n
        else:
            c1, c2 = tl.split(sums * inv_n)
        _bwd_store_dx(DX, row64, N, cols, mask, dxhat, xhat, rstd, c1, c2, RMS)
        if BLOCK_B > 0:
            _bwd_store_dx(DX, row64, N, cols_b, mask_b, dxhat_b, xhat_b, rstd, c1, c2, RMS)
    if HAS_W:
        tl.store(DWp + pid * N + cols, dw, mask=mask)
        if BLOCK_B > 0:
            tl.store(DWp + pid * N + cols_b, dw_b, mask=mask_b)
    if HAS_B:
        tl.store(DBp + pid * N + cols, db, mask=mask)
        if BLOCK_B > 0:
            tl.store(DBp + pid * N + cols_b, db_b, mask=mask_b)


@triton.jit
def _bwd_row_stats_kernel(
    DY, X, W, B, Mean, Rstd, C1, C2,
    N, stride_dy, stride_x, inv_n,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    s1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32) if HAS_B else 0.0
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dxhat = dy * _gelu_grad(xhat * w + b, TANH, WIDE, FAST) * w
        s1 += dxhat
        s2 += dxhat * xhat
    tl.store(C1 + row, tl.sum(s1, axis=0) * inv_n)
    tl.store(C2 + row, tl.sum(s2, axis=0) * inv_n)


@triton.jit
def _bwd_tiles_kernel(
    DY, X, W, B, Mean, Rstd, C1, C2, DX, DWp, DBp,
    n_rows, N, stride_dy, stride_x, rows_per_group,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr, TANH: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32) if HAS_B else 0.0
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = group * rows_per_group
    last = tl.minimum(first + rows_per_group, n_rows)
    for row in range(first, last):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        dz = dy * _gelu_grad(xhat * w + b, TANH, WIDE, FAST)
        dw += dz * xhat
        db += dz
        c1 = 0.0 if RMS else tl.load(C1 + row)
        dx = rstd * (dz * w - c1 - xhat * tl.load(C2 + row))
        tl.store(DX + row64 * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DWp + group * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DBp + group * N + cols, db, mask=mask)


@triton.jit
def _sum_partials_kernel(P0, P1, Out0, Out1, n_parts, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out_k[cols] = sum over parts of P_k[part, cols], k = program_id(1): dweight and dbias in
    one launch (a Triton launch costs ~40 us of CPU on the GPU machine's host)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(1) == 0:
        P = P0
        Out = Out0
    else:
        P = P1
        Out = Out1
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts[:, None] < n_parts) & (cols[None, :] < N)
        acc += tl.load(P + parts[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cols < N)


# ------------------------------------------------------------------------------------------
# Launchers


def _num_programs_per_device(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs exercise the grid-stride loops
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:  # cached: every backward call asks (host time, see perf notes)
    return torch.cuda.get_device_properties(index).multi_processor_count


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


def _bwd_row_blocks(n: int, two_chunks: bool = True) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B) of _bwd_rows_kernel: the largest power of two <= n and the next one
    >= the rest (5120 = 4096 + 1024, 12288 = 8192 + 4096); (next_power_of_2(n), 0) for a power
    of two, when the rest needs BLOCK_A too (1000: 512 + 512) or when not two_chunks."""
    block = triton.next_power_of_2(n)
    if two_chunks and block != n:
        block_a = block // 2
        block_b = triton.next_power_of_2(n - block_a)
        if block_b < block_a:
            return block_a, block_b
    return block, 0


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
            block, warps = 16384, 32
        block = config.get("block", block)
        launch(_fwd_loop_kernel, (rows,), args, dict(flags, BLOCK_N=block),
               num_warps=config.get("num_warps", warps))
    return y, h, mean, rstd


def _sum_partials(dwp: torch.Tensor, dbp: torch.Tensor, dw: torch.Tensor, db: torch.Tensor,
                  has: tuple[bool, bool]) -> None:
    """dw, db (when has[0], has[1]) = column sums of their [parts, n] fp32 partials."""
    n_parts, n = dwp.shape
    which = [k for k in (0, 1) if has[k]]
    parts, out = (dwp, dbp), (dw, db)
    first, last = which[0], which[-1]  # grid axis 1 picks 0 = first, 1 = last
    block_n = 128
    launch(_sum_partials_kernel, (triton.cdiv(n, block_n), len(which)),
           (parts[first], parts[last], out[first], out[last], n_parts, n),
           dict(BLOCK_P=32, BLOCK_N=block_n), num_warps=4)


def layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd, rmsnorm: bool, tanh: bool,
                       config: dict | None = None):
    """`config` overrides the launch choices (num_warps, per_sm, prefetch, max_row_block, block,
    two_chunks: False = one padded power-of-two block) for tuning sweeps."""
    with on_device(x.device):
        return _bwd(dy, x, weight, bias, mean, rstd, rmsnorm, tanh, config or {})


def _bwd(dy, x, weight, bias, mean, rstd, rmsnorm: bool, tanh: bool, config: dict):
    rows, n = x.shape
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)

    def empty():  # distinct tensors: custom-op outputs must not alias each other
        return torch.empty((0,), dtype=x.dtype, device=x.device)

    if rows == 0:
        dw = torch.zeros_like(weight) if weight is not None else empty()
        db = torch.zeros_like(bias) if bias is not None else empty()
        return dx, dw, db
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, RMS=rmsnorm, TANH=tanh,
                 WIDE=x.dtype == torch.float32, FAST=x.is_cuda)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    block_a, block_b = _bwd_row_blocks(n, config.get("two_chunks", True))
    total = block_a + block_b
    limit = config.get("max_row_block", MAX_ROW_BLOCK_BWD)
    if total <= (limit if block_b else min(limit, MAX_ONE_BLOCK_BWD)):
        # Persistent programs (H100 bf16, 16384x8192: 16 warps x 1 per SM 561 us, x 2 per SM
        # 580 us, 8 warps x 1 per SM 691 us; 65536x1024: 8 warps x 1 per SM 708 us, x 2 421 us):
        # one big program per SM for long rows, several small ones for short rows. Two chunks:
        # the warps of the padded block, programs by BLOCK_A (H100 bf16 32768x3072: 2 per SM
        # 263 us, 1 per SM 353), no prefetch past 9216 (it spills; 8192x12288: 427 us vs 487).
        per_sm = config.get("per_sm", max(1, min(8, 4096 // block_a)))
        # stages > 1 (config only, not yet the default): the row loop pipelined through shared
        # memory. H100 bf16, stages 4 vs today's register prefetch (outputs bitwise equal for
        # bf16/fp16/fp32, widths 96-12288): 16384x8192 285 vs 391 us, 32768x5120 465 vs 573,
        # 65536x1024 165 vs 197; 8192x12288 611 vs 426 (spills). Needs (stages - 1) x 2 rows of
        # shared memory.
        stages = config.get("stages", 1)
        warps = max(4, min(16, triton.next_power_of_2(total) // 512))
        programs = min(rows, per_sm * _num_programs_per_device(x.device))
        dwp, dbp = torch.empty((2, programs, n), dtype=torch.float32, device=x.device).unbind(0)
        launch(_bwd_rows_kernel, (programs,),
               (dy, x, w, b, mean, rstd, dx, dwp, dbp, rows, n, dy.stride(0), x.stride(0), 1.0 / n),
               dict(flags, BLOCK_A=block_a, BLOCK_B=block_b, STAGES=stages,
                    PREFETCH=config.get("prefetch", total <= 9216 and stages == 1)),
               num_warps=config.get("num_warps", warps))
    else:
        c1, c2 = torch.empty((2, rows), dtype=torch.float32, device=x.device).unbind(0)
        launch(_bwd_row_stats_kernel, (rows,),
               (dy, x, w, b, mean, rstd, c1, c2, n, dy.stride(0), x.stride(0), 1.0 / n),
               dict(HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], TANH=tanh, WIDE=flags["WIDE"],
                    FAST=flags["FAST"], BLOCK_N=config.get("block", LOOP_BLOCK)),
               num_warps=config.get("num_warps", 8))
        tile_cols = config.get("tile_cols", TILE_COLS)
        col_tiles = triton.cdiv(n, tile_cols)
        groups = max(1, min(rows, 4 * _num_programs_per_device(x.device) // col_tiles))
        rows_per_group = triton.cdiv(rows, groups)
        groups = triton.cdiv(rows, rows_per_group)
        dwp, dbp = torch.empty((2, groups, n), dtype=torch.float32, device=x.device).unbind(0)
        launch(_bwd_tiles_kernel, (col_tiles, groups),
               (dy, x, w, b, mean, rstd, c1, c2, dx, dwp, dbp,
                rows, n, dy.stride(0), x.stride(0), rows_per_group),
               dict(flags, BLOCK_N=tile_cols), num_warps=config.get("tile_warps", 4))
    dw = torch.empty_like(weight) if weight is not None else empty()
    db = torch.empty_like(bias) if bias is not None else empty()
    if weight is not None or bias is not None:
        _sum_partials(dwp, dbp, dw, db, (weight is not None, bias is not None))
    return dx, dw, db
