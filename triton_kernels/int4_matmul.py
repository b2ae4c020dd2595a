"""Triton kernels for the INT4 group-dequant GEMM (W4A16), their launchers and the config table.

Contract (ops/int4_matmul.py validates before calling): x [M, K] fp16/bf16 with unit last
stride; packed int32 [N, ceil(K/8)], scales [G, N], zeros uint8 [G, N] or None (symmetric:
zero point 8), all contiguous (format: deepkern/quant/int4.py); `group` = consecutive K per
group (K for channelwise); bias [N] or None. Output y [M, N] in x's dtype, fp32 accumulation.

Kernels:
- _gemv_kernel (small M, default M == 1): FMA units only. Each program streams a
  [BLOCK_N, BLOCK_K] slab of the weight; the K range is split over programs (split-K) so that
  every SM streams. Per code: one LOP3 (mask + magic exponent), one FADD (- zero offset), one
  FFMA with x; the scale is applied once per 8-code word in fp32:
      sum_k x_k (q_k - z) s = s * sum_k (q_k - z) x_k
  so w is never rounded to x's dtype here (more accurate than the reference by that rounding).
- _dot_kernel (larger M): tensor-core tiles (tl.dot) with the weight tile dequantized in
  registers, bit-identical to Int4Weight.dequantize(x.dtype); split-K for small M too.
- _dx_kernel (backward): dx = dy @ W, same dequantized tiles, untransposed.
Split-K programs write fp32 partials [splits, M, N] that _splitk_reduce_kernel sums in a fixed
order (no atomics), then adds the bias: results are bit-identical run to run.

Unpacking (_unpack): a code masked in place at bit 4p and OR-ed into the exponent bits of 2^23
is the fp32 2^23 + q 16^p exactly (no int->float conversion, which runs at 1/4 rate, and no
shift per code); subtracting 2^23 + z 16^p leaves (q - z) 16^p exactly, and the 16^-p goes
into x (GEMV) or the scale (tiles), both exact. Offline SASS (sm_90a, triton 3.8) of the
GEMV loop: ~5.6 instructions per weight element, 0 spills; tiles 128x128x64: ~9 per element
per 256-thread CTA including the wgmma feed.

Config: CONFIGS[gpu kind] is a list of (max M, max N, max K, Config) rows; the first row that
fits the call wins. Kinds are "sm90" etc. from the device capability, "cpu" for the Triton
interpreter, "default" otherwise. No autotuning: a call never times anything. For a tuning
sweep, `with config_override(Config(...)):` forces one config (eager calls only).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from deepkern._backend import on_device

from ._device import cuda_facts
from ._launch import launch

MAGIC_BITS = 0x4B000000  # float bits of 2^23, passed as a kernel argument (see _unpack)
MAGIC_F = tl.constexpr(8388608.0)  # 2^23


@dataclasses.dataclass(frozen=True)
class Config:
    kernel: str  # "gemv" or "dot"
    block_m: int  # dot only (gemv programs take one row each)
    block_n: int
    block_k: int  # multiple of 8 (gemv), of 16 (dot); power of two
    split_k: int = 0  # 0: enough K splits to give each SM `waves` programs; 1: no split
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # dot: programs sharing weight columns run close in time (L2 reuse)
    swap: bool = False  # dot: compute y^T = W x^T (the weight as the register operand)
    waves: int = 2  # programs per SM that split_k=0 aims for
    prefetch: bool = False  # gemv: load the next weight tile before unpacking this one


_BIG = 1 << 62
# Tile configs per GPU kind ("default": untuned guesses for other GPUs). The weight streams
# once per BLOCK_M rows of x, so small M wants narrow tiles and many K splits, large M the
# largest tiles that keep the tensor cores fed.
CONFIGS: dict[str, list[tuple[int, int, int, Config]]] = {
    # H100 sweep under CUDA graphs (bench/int4_matmul.py --sweep, GPU time, L2 cleared;
    # 2026-11-22 f), (K, N) = (8192, 8192) unless said; cuBLAS fp16 60 / 60 / 61 / 62 / 192 /
    # 830 us at M = 1 / 16 / 64 / 128 / 1024 / 4096. GEMV M=1 28.6 us ((8192, 28672): 73.3 with
    # 8-row, 2048-column tiles). Tensor-core tiles, all with the weight as the register operand
    # (swap; the plain orientation was 1-4% slower where it placed): M=16 36.6 ((8192, 28672):
    # 101.7 with 128-row tiles and 8 programs per SM), M=64 45.1, M=128 59.7, M=1024 306,
    # M=4096 1279 (3 stages; 4 stages 1322, but 306 vs 319 at M=1024).
    "sm90": [
        (1, 16384, _BIG, Config("gemv", 1, 16, 1024, 0, num_warps=4, num_stages=1, waves=2)),
        (1, _BIG, _BIG, Config("gemv", 1, 8, 2048, 0, num_warps=4, num_stages=1, waves=2)),
        (16, 16384, _BIG, Config("dot", 16, 64, 128, 0, num_warps=4, num_stages=3, waves=4, swap=True)),
        (16, _BIG, _BIG, Config("dot", 16, 128, 128, 0, num_warps=4, num_stages=3, waves=8, swap=True)),
        (64, _BIG, _BIG, Config("dot", 64, 64, 128, 0, num_warps=4, num_stages=3, waves=2, swap=True)),
        (256, _BIG, _BIG, Config("dot", 128, 64, 128, 0, num_warps=4, num_stages=3, waves=1, swap=True)),
        (2048, _BIG, _BIG, Config("dot", 256, 128, 64, 1, num_warps=8, num_stages=4, swap=True)),
        (_BIG, _BIG, _BIG, Config("dot", 256, 128, 64, 1, num_warps=8, num_stages=3, swap=True)),
    ],
    "default": [
        (1, _BIG, _BIG, Config("gemv", 1, 32, 256, 0, num_warps=4, num_stages=3, waves=4)),
        (16, _BIG, _BIG, Config("dot", 16, 64, 64, 0, num_warps=4, num_stages=3, waves=3)),
        (128, _BIG, _BIG, Config("dot", 64, 64, 64, 0, num_warps=4, num_stages=3, waves=2)),
        (_BIG, _BIG, _BIG, Config("dot", 128, 128, 32, 1, num_warps=8, num_stages=3)),
    ],
    # Triton interpreter (CPU tests): small blocks so masks, several programs and split-K
    # are all exercised on small shapes.
    "cpu": [
        (1, _BIG, _BIG, Config("gemv", 1, 16, 64, 0, waves=2)),
        (16, _BIG, _BIG, Config("dot", 16, 32, 64, 0, waves=2, swap=True)),
        (_BIG, _BIG, _BIG, Config("dot", 16, 32, 64, 0, waves=2)),
    ],
}
# Backward (dx = dy @ W): one tile config per kind; the reduction runs over N.
DX_CONFIGS: dict[str, Config] = {
    "sm90": Config("dot", 64, 64, 64, 1, num_warps=4, num_stages=4),
    "default": Config("dot", 64, 64, 64, 1, num_warps=4, num_stages=3),
    "cpu": Config("dot", 16, 32, 32, 1),
}

_OVERRIDE: list[Config] = []


@contextlib.contextmanager
def config_override(config: Config):
    """Forces `config` on every forward call inside the block (tuning sweeps; eager only)."""
    _check_config(config)
    _OVERRIDE.append(config)
    try:
        yield config
    finally:
        _OVERRIDE.pop()


def _check_config(c: Config) -> None:
    if c.kernel not in ("gemv", "dot"):
        raise ValueError(f"Config.kernel must be 'gemv' or 'dot', got {c.kernel!r}")
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(c, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"Config.{name} must be a power of two, got {v}")
    # dot: block_k >= 32 because 16x16x16 tiles summed some products twice on an H100
    # (Triton 3.6; tests/test_int4_matmul.py::test_dequantization_is_exact, g=32).
    if c.block_k < (8 if c.kernel == "gemv" else 32) or (c.kernel == "dot" and min(c.block_m, c.block_n) < 16):
        raise ValueError(f"Config {c}: blocks too small (gemv: block_k >= 8; dot: block_m, block_n >= 16, "
                         "block_k >= 32)")


def device_facts(device: torch.device) -> tuple[str, int]:
    """(kind, number of SMs): kind keys CONFIGS ("sm90", ...; "cpu" for the interpreter)."""
    if device.type != "cuda":
        return "cpu", 4
    f = cuda_facts(device)
    return f"sm{f.major}{f.minor}", f.sms


def select_config(device: torch.device, m: int, n: int, k: int) -> Config:
    """The config a forward call of this shape uses (the override, else the table)."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    kind, _ = device_facts(device)
    rows = CONFIGS.get(kind, CONFIGS["default"])
    for max_m, max_n, max_k, config in rows:
        if m <= max_m and n <= max_n and k <= max_k:
            return config
    return rows[-1][3]


def _split_k(config: Config, tiles: int, k: int, sms: int) -> tuple[int, int]:
    """(splits, K per split): K per split is a multiple of block_k, every split non-empty."""
    k_tiles = triton.cdiv(k, config.block_k)
    if config.split_k == 0:
        want = max(1, triton.cdiv(config.waves * sms, tiles))
        split = min(want, max(1, k_tiles // 2))  # at least two K tiles per split
    else:
        split = min(config.split_k, k_tiles)
    per_split = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per_split), per_split * config.block_k


# ------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _pos_scale(INVERSE: tl.constexpr):
    """[8] fp32: 16^p(i) (or 16^-p(i)) for the code positions p = 0,1,2,3,1,2,3,4 of _unpack."""
    i = tl.arange(0, 8)
    p = tl.where(i < 4, i, i - 3)
    if INVERSE:
        return tl.where(p == 0, 1.0, tl.where(p == 1, 0.0625, tl.where(p == 2, 0.00390625,
                        tl.where(p == 3, 0.000244140625, 0.0000152587890625))))
    return tl.where(p == 0, 1.0, tl.where(p == 1, 16.0, tl.where(p == 2, 256.0,
                    tl.where(p == 3, 4096.0, 65536.0))))


@triton.jit
def _unpack(words, magic, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 words [ROWS, COLS] -> fp32 [ROWS, COLS, 8]: element i of word c is
    2^23 + q_i * 16^p(i), p = 0,1,2,3,1,2,3,4 (exact: q * 16^4 < 2^23).

    Each code is masked in place and OR-ed with the exponent bits of 2^23 (`magic`, a runtime
    argument so ptxas fuses mask and OR into one LOP3): 8 LOP3 + 1 shift per word, no
    int->float conversion. Callers fold 16^p into the zero offset and into x or the scale.
    The joins keep a word's 8 codes in the thread that loaded it (innermost join = most
    significant index bit); a broadcast [..., 8] shift would spread them over lanes."""
    t = words >> 12  # codes 3..7 at bits 0..19
    c0 = (words & 0xF) | magic
    c1 = (words & 0xF0) | magic
    c2 = (words & 0xF00) | magic
    c3 = (words & 0xF000) | magic
    c4 = (t & 0xF0) | magic
    c5 = (t & 0xF00) | magic
    c6 = (t & 0xF000) | magic
    c7 = (t & 0xF0000) | magic
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))  # [.., 2 (i >= 4), 2 (i & 2)]
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    v = tl.reshape(tl.join(even, odd), [ROWS, COLS, 8])
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_words(words, s, z, magic, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Words [BLOCK_N, BLOCK_KW] with their scales s and zero points z ([BLOCK_N, 1]: one
    group per row; or [BLOCK_N, BLOCK_KW]: per word) as the [BLOCK_N, 8*BLOCK_KW] tile in
    DTYPE: (2^23 + q 16^p) - (2^23 + z 16^p) = (q - z) 16^p and (s 16^-p) are exact in fp32,
    so their product is the exact (q - z) s, rounded once to DTYPE."""
    f = _unpack(words, magic, BLOCK_N, BLOCK_KW)
    zoff = z.to(tl.float32)[:, :, None] * _pos_scale(False)[None, None, :] + MAGIC_F
    w = (f - zoff) * (s.to(tl.float32)[:, :, None] * _pos_scale(True)[None, None, :])
    return tl.reshape(w.to(DTYPE), [BLOCK_N, BLOCK_KW * 8])


@triton.jit
def _dequant_tile(
    P, S, Z, n, n_mask, k0, N, KW, group, magic,
    DTYPE: tl.constexpr, HAS_ZEROS: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """Weight rows n, columns k0 .. k0 + 8*BLOCK_KW - 1 as a [BLOCK_N, 8*BLOCK_KW] tile in
    DTYPE, equal to Int4Weight.dequantize(DTYPE) (finite garbage where out of range)."""
    kw = k0 // 8 + tl.arange(0, BLOCK_KW)
    mask = n_mask[:, None] & (kw < KW)[None, :]
    words = tl.load(P + n[:, None].to(tl.int64) * KW + kw[None, :], mask=mask, other=0)
    if SCALE_PER_TILE:
        grp = k0 // group
        s = tl.load(S + grp * N + n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(Z + grp * N + n, mask=n_mask, other=0).to(tl.float32)
        else:
            z = tl.full([BLOCK_N], 8.0, tl.float32)
        s = s[:, None]
        z = z[:, None]
    else:
        idx = ((kw * 8) // group)[None, :] * N + n[:, None]
        s = tl.load(S + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(Z + idx, mask=mask, other=0).to(tl.float32)
        else:
            z = tl.full([BLOCK_N, BLOCK_KW], 8.0, tl.float32)
    return _dequant_words(words, s, z, magic, DTYPE, BLOCK_N, BLOCK_KW)


@triton.jit
def _epilogue(acc, Out, Part, Bias, rows, cols, M, N, pid_s, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [R, C] fp32 for rows x cols of y: partials when split, else y (+ bias)."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    if SPLIT:
        tl.store(Part + pid_s.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc = acc + tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    X, P, S, Z, Out, Part, Bias,
    M, N, K, KW, stride_xm, k_per_split, group, magic,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Rows of x vary fastest across programs: programs reading the same weight slab run
    # together (L2 reuse when M > 1), and axis 0 has room for any M.
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    p_rows = P + n[:, None].to(tl.int64) * KW
    x_row = X + row.to(tl.int64) * stride_xm
    # Code i of a word comes out of _unpack as 2^23 + q 16^p(i): its zero offset is
    # 2^23 + z 16^p and its x is divided by 16^p (both exact), so no shift per code.
    pos = _pos_scale(False)
    inv = _pos_scale(True)
    acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    kw_end = tl.minimum((k_start + k_per_split) // 8, KW)  # k_per_split % 8 == 0
    if PREFETCH:  # the first tile; each iteration then loads the next one before unpacking
        kw = k_start // 8 + tl.arange(0, BLOCK_KW)
        next_words = tl.load(p_rows + kw[None, :], mask=n_mask[:, None] & (kw < kw_end)[None, :], other=0)
    for k0 in range(k_start, k_end, BLOCK_KW * 8):
        kw = k0 // 8 + tl.arange(0, BLOCK_KW)
        w_mask = n_mask[:, None] & (kw < KW)[None, :]
        if PREFETCH:
            # Register double buffering: Triton does not software-pipeline loads that feed no
            # tl.dot, so without this a program has one tile of weights in flight at a time.
            words = next_words
            kw_next = kw + BLOCK_KW
            next_words = tl.load(p_rows + kw_next[None, :], mask=n_mask[:, None] & (kw_next < kw_end)[None, :], other=0)
        else:
            words = tl.load(p_rows + kw[None, :], mask=w_mask, other=0)
        k = kw[:, None] * 8 + tl.arange(0, 8)[None, :]
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32) * inv[None, :]
        f = _unpack(words, magic, BLOCK_N, BLOCK_KW)
        if SCALE_PER_TILE:
            grp = k0 // group
            s = tl.load(S + grp * N + n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(Z + grp * N + n, mask=n_mask, other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            zoff = (z[:, None] * pos[None, :] + MAGIC_F)[:, None, :]
            acc += tl.sum((f - zoff) * x[None, :, :], axis=2) * s[:, None]  # s * sum (q - z) x
        else:
            idx = ((kw * 8) // group)[None, :] * N + n[:, None]
            s = tl.load(S + idx, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(Z + idx, mask=w_mask, other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N, BLOCK_KW], 8.0, tl.float32)
            zoff = z[:, :, None] * pos[None, None, :] + MAGIC_F
            acc += tl.sum((f - zoff) * x[None, :, :], axis=2) * s
    out = tl.sum(acc, axis=1)
    mask = n_mask
    if SPLIT:
        tl.store(Part + (pid_s.to(tl.int64) * M + row) * N + n, out, mask=mask)
    else:
        if HAS_BIAS:
            out += tl.load(Bias + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row.to(tl.int64) * N + n, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _load_group(S, Z, k, K, N, n, n_mask, group, HAS_ZEROS: tl.constexpr):
    """Scales and zero points [BLOCK_N] of the group holding column min(k, K - 1)."""
    offs = (tl.minimum(k, K - 1) // group) * N + n
    s = tl.load(S + offs, mask=n_mask, other=0.0)
    if HAS_ZEROS:
        z = tl.load(Z + offs, mask=n_mask, other=0)
    else:
        z = tl.full(n.shape, 8, tl.uint8)
    return s, z


@triton.jit
def _dot_kernel(
    X, P, S, Z, Out, Part, Bias,
    M, N, K, KW, stride_xm, k_per_split, group, magic,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr,
):
    """y tile [BLOCK_M, BLOCK_N] over this program's K split. SWAP computes its transpose,
    W tile @ x tile^T, so the dequantized weight is the register operand of the tensor-core
    op and BLOCK_M (the batch) can be as small as 16 without padding the weight side."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    x_rows = X + rows[:, None].to(tl.int64) * stride_xm
    p_rows = P + n[:, None].to(tl.int64) * KW
    m_mask = (rows < M)[:, None]
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if SCALE_PER_TILE:
        # The next tile's scales/zeros load one iteration ahead: Triton's pipeliner leaves
        # these small loads synchronous (a global-load latency per K step otherwise).
        s_next, z_next = _load_group(S, Z, k_start, K, N, n, n_mask, group, HAS_ZEROS)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=m_mask & (k < K)[None, :], other=0.0)
        if SCALE_PER_TILE:
            # k0 is a multiple of BLOCK_K: 16-byte copies of the word rows.
            kw = tl.max_contiguous(tl.multiple_of(k0 // 8, BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8), BLOCK_K // 8)
            words = tl.load(p_rows + kw[None, :], mask=n_mask[:, None] & (kw < KW)[None, :], other=0)
            s, z = s_next, z_next
            s_next, z_next = _load_group(S, Z, k0 + BLOCK_K, K, N, n, n_mask, group, HAS_ZEROS)
            w = _dequant_words(words, s[:, None], z[:, None], magic, X.dtype.element_ty, BLOCK_N, BLOCK_K // 8)
        else:
            w = _dequant_tile(P, S, Z, n, n_mask, k0, N, KW, group, magic, X.dtype.element_ty,
                              HAS_ZEROS, SCALE_PER_TILE, BLOCK_N, BLOCK_K // 8)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(acc, Out, Part, Bias, rows, n, M, N, pid_s, SPLIT, HAS_BIAS)


@triton.jit
def _dx_kernel(
    DY, P, S, Z, DX, M, N, K, KW, stride_dym, group, magic,
    HAS_ZEROS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx [M, K] = dy [M, N] @ W [N, K]: output tile [BLOCK_M, BLOCK_K], reduction over N."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    dy_rows = DY + rows[:, None].to(tl.int64) * stride_dym
    m_mask = (rows < M)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        dy = tl.load(dy_rows + n[None, :], mask=m_mask & n_mask[None, :], other=0.0)
        w = _dequant_tile(P, S, Z, n, n_mask, k0, N, KW, group, magic, DY.dtype.element_ty,
                          HAS_ZEROS, SCALE_PER_TILE, BLOCK_N, BLOCK_K // 8)
        acc = tl.dot(dy, w, acc)
    k = k0 + tl.arange(0, BLOCK_K)
    mask = m_mask & (k < K)[None, :]
    tl.store(DX + rows[:, None].to(tl.int64) * K + k[None, :], acc.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    P, S, Z, D, N, K, KW, group, magic,
    HAS_ZEROS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """D [N, K] = the dense weight in D's dtype (the tiles the matmul kernels build)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = n < N
    w = _dequant_tile(P, S, Z, n, n_mask, k0, N, KW, group, magic, D.dtype.element_ty,
                      HAS_ZEROS, SCALE_PER_TILE, BLOCK_N, BLOCK_K // 8)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(D + n[:, None].to(tl.int64) * K + k[None, :], w, mask=n_mask[:, None] & (k < K)[None, :])


@triton.jit
def _splitk_reduce_kernel(Part, Bias, Out, splits, MN, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):  # fixed order: the same bits every run
        acc += tl.load(Part + tl.cast(s, tl.int64) * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Launchers


def _scale_per_tile(group: int, k: int, block_k: int) -> bool:
    """True when every K tile of block_k lies inside one group (one scale per row per tile)."""
    return group >= k or group % block_k == 0


def int4_matmul_fwd(x, packed, scales, zeros, group: int, bias, config: Config | None = None):
    """y [M, N] = x [M, K] @ W.T (+ bias), W dequantized in registers."""
    with on_device(x.device):
        return _fwd(x, packed, scales, zeros, group, bias, config)


def _fwd(x, packed, scales, zeros, group: int, bias, config: Config | None):
    m, k = x.shape
    n, kw = packed.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    config = config or select_config(x.device, m, n, k)
    _, sms = device_facts(x.device)
    if config.kernel == "gemv":
        tiles = m * triton.cdiv(n, config.block_n)
    else:
        tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    splits, k_per_split = _split_k(config, tiles, k, sms)
    part = torch.empty((splits, m, n) if splits > 1 else (0,), dtype=torch.float32, device=x.device)
    common = (
        x, packed, scales, zeros if zeros is not None else scales, out, part,
        bias if bias is not None else out, m, n, k, kw, x.stride(0), k_per_split, group, MAGIC_BITS,
    )
    flags = dict(
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        SCALE_PER_TILE=_scale_per_tile(group, k, config.block_k),
    )
    if config.kernel == "gemv":
        grid = (m, triton.cdiv(n, config.block_n), splits)
        launch(_gemv_kernel, grid, common,
               dict(flags, BLOCK_N=config.block_n, BLOCK_KW=config.block_k // 8, PREFETCH=config.prefetch),
               num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), splits)
        launch(_dot_kernel, grid, common,
               dict(flags, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                    GROUP_M=config.group_m, SWAP=config.swap),
               num_warps=config.num_warps, num_stages=config.num_stages)
    if splits > 1:
        block = 1024
        launch(_splitk_reduce_kernel, (triton.cdiv(m * n, block),),
               (part, bias if bias is not None else out, out, splits, m * n, n),
               dict(HAS_BIAS=bias is not None, BLOCK=block), num_warps=4)
    return out


def int4_matmul_dx(dy, packed, scales, zeros, group: int, k: int, config: Config | None = None):
    """dx [M, K] = dy [M, N] @ W, W dequantized tile by tile (no dense copy)."""
    with on_device(dy.device):
        return _dx(dy, packed, scales, zeros, group, k, config)


def _dx(dy, packed, scales, zeros, group: int, k: int, config: Config | None):
    m, n = dy.shape
    kw = packed.shape[1]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    if config is None:
        kind, _ = device_facts(dy.device)
        config = DX_CONFIGS.get(kind, DX_CONFIGS["default"])
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(k, config.block_k))
    _dx_kernel[grid](
        dy, packed, scales, zeros if zeros is not None else scales, dx, m, n, k, kw, dy.stride(0),
        group, MAGIC_BITS, HAS_ZEROS=zeros is not None, SCALE_PER_TILE=_scale_per_tile(group, k, config.block_k),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dx


def int4_dequantize(packed, scales, zeros, group: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` (fp16/bf16), bit-identical to Int4Weight.dequantize:
    one pass that reads the 4-bit codes and writes the dense copy. For a dequantize-then-GEMM
    path at large M (bench provider "deepkern-dequant-cublas"); not used by `auto` yet."""
    with on_device(packed.device):
        n, kw = packed.shape
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
        if n == 0 or k == 0:
            return out
        block_n, block_k = (16, 64) if packed.device.type == "cpu" else (64, 128)
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
        _dequant_kernel[grid](
            packed, scales, zeros if zeros is not None else scales, out, n, k, kw, group, MAGIC_BITS,
            HAS_ZEROS=zeros is not None, SCALE_PER_TILE=_scale_per_tile(group, k, block_k),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
        return out
