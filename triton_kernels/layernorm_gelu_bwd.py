"""Triton backward of layernorm_gelu (see layernorm_gelu.py for the paths and the contract):
dx, and dweight/dbias as fp32 per-program partials summed in a fixed order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepkern._backend import on_device

from ._launch import launch
from .layernorm_gelu_common import _gelu_grad, _num_programs_per_device, _shared_memory

# Backward in registers: one row block up to MAX_ONE_BLOCK_BWD (above, it spills: x, dy, w, b,
# dw, db per element; H100 8192x12288 bf16 as one 16384 block 1851 us, the two-kernel path
# wins); two chunks up to MAX_ROW_BLOCK_BWD together (12288 = 8192 + 4096).
MAX_ONE_BLOCK_BWD = 8192
MAX_ROW_BLOCK_BWD = 16384
# The looped backward (rows past MAX_ROW_BLOCK_BWD): a statistics kernel (one program per
# row, STATS_BLOCK columns per step, STATS_WARPS warps: 4 elements per thread) and the tiles
# kernel (TILE_COLS columns x a group of rows per program, TILE_WARPS warps). H100 bf16,
# backward alone, (stats block x warps, tile warps) = (4096 x 8, 4) before / (1024 x 8, 8):
# 4096x65536 1187 / 1008 us, 2048x131072 1183 / 1017, 8192x20000 783 / 666
# (.dev/ln_bwd_cfg.py; 2048 x 16 and 512 x 4 within 1%, 1024 x 16 7% slower).
TILE_COLS = 1024
TILE_WARPS = 8
STATS_BLOCK = 1024
STATS_WARPS = 8


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


# The row loop pipelined through shared memory: Triton's pipeliner cp.async-copies x and dy of
# the rows STAGES - 1 steps ahead, as the CUDA backward's copy ring does. H100 bf16, 4 stages vs
# the register prefetch (outputs bitwise equal for bf16/fp16/fp32, widths 96-12288): 16384x8192
# 285 vs 391 us, 32768x5120 465 vs 573, 65536x1024 165 vs 197. Past 9216 columns the row does
# not fit in registers with its copies in flight (8192x12288: 611 vs 426 us, spills): 1 stage.
MAX_STAGES_BWD = 4
MAX_PREFETCH_BWD = 9216  # register prefetch spills past this (8192x12288: 427 us without, 487 with)
_SMEM_RESERVE = 16 * 1024  # the kernel's own shared memory (cross-warp reductions) and slack


def _bwd_stages(total: int, itemsize: int, per_sm: int, device: torch.device) -> int:
    """Pipeline depth of the rows kernel: up to MAX_STAGES_BWD while (stages - 1) rows of x and
    dy fit in a program's share of the SM's shared memory; 1 (no pipelining) otherwise."""
    if total > MAX_PREFETCH_BWD:
        return 1
    per_block, per_sm_bytes = _shared_memory(device)
    budget = min(per_block, per_sm_bytes // per_sm) - _SMEM_RESERVE
    stages = min(MAX_STAGES_BWD, 1 + budget // (2 * total * itemsize))
    return stages if stages >= 2 else 1


def layernorm_gelu_bwd(dy, x, weight, bias, mean, rstd, rmsnorm: bool, tanh: bool,
                       config: dict | None = None):
    """`config` overrides the launch choices (num_warps, per_sm, prefetch, stages, max_row_block, block,
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
        stages = config.get("stages", _bwd_stages(total, x.element_size(), per_sm, x.device))
        warps = max(4, min(16, triton.next_power_of_2(total) // 512))
        programs = min(rows, per_sm * _num_programs_per_device(x.device))
        dwp, dbp = torch.empty((2, programs, n), dtype=torch.float32, device=x.device).unbind(0)
        launch(_bwd_rows_kernel, (programs,),
               (dy, x, w, b, mean, rstd, dx, dwp, dbp, rows, n, dy.stride(0), x.stride(0), 1.0 / n),
               dict(flags, BLOCK_A=block_a, BLOCK_B=block_b, STAGES=stages,
                    PREFETCH=config.get("prefetch", total <= MAX_PREFETCH_BWD and stages == 1)),
               num_warps=config.get("num_warps", warps))
    else:
        c1, c2 = torch.empty((2, rows), dtype=torch.float32, device=x.device).unbind(0)
        launch(_bwd_row_stats_kernel, (rows,),
               (dy, x, w, b, mean, rstd, c1, c2, n, dy.stride(0), x.stride(0), 1.0 / n),
               dict(HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], TANH=tanh, WIDE=flags["WIDE"],
                    FAST=flags["FAST"], BLOCK_N=config.get("block", STATS_BLOCK)),
               num_warps=config.get("num_warps", STATS_WARPS))
        tile_cols = config.get("tile_cols", TILE_COLS)
        col_tiles = triton.cdiv(n, tile_cols)
        groups = max(1, min(rows, 4 * _num_programs_per_device(x.device) // col_tiles))
        rows_per_group = triton.cdiv(rows, groups)
        groups = triton.cdiv(rows, rows_per_group)
        dwp, dbp = torch.empty((2, groups, n), dtype=torch.float32, device=x.device).unbind(0)
        launch(_bwd_tiles_kernel, (col_tiles, groups),
               (dy, x, w, b, mean, rstd, c1, c2, dx, dwp, dbp,
                rows, n, dy.stride(0), x.stride(0), rows_per_group),
               dict(flags, BLOCK_N=tile_cols), num_warps=config.get("tile_warps", TILE_WARPS))
    dw = torch.empty_like(weight) if weight is not None else empty()
    db = torch.empty_like(bias) if bias is not None else empty()
    if weight is not None or bias is not None:
        _sum_partials(dwp, dbp, dw, db, (weight is not None, bias is not None))
    return dx, dw, db
