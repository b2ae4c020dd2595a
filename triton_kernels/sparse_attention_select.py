"""Triton kernels for the block selection of sparse_attention (pooled summaries + streaming
top-k) and its launcher. Semantics: deepkern.reference.sparse_attention.

Memory grows like nb * (D + topk), never nb^2: the summaries are fp32 [B*Hkv, nb, D], the
top-k kernel keeps each query block's running best `topk` (score, j) pairs in registers while
it streams over the key-block summaries in chunks, then writes each row's final indices
(sinks, choices and local blocks, ascending, -1 padded: the assembly is part of the kernel,
since as ~10 small torch ops it cost ~210 us of host time per call on the H100 machine).

Top-k merge: a program owns BM query blocks (16 or 64: rows_per_program). Per chunk of BC
key blocks it computes the [BM, BC] scores with one fp32-accurate tensor-core dot (3xTF32),
then repeatedly moves each row's best remaining chunk candidate into the row's running set in
place of the set's worst member, while some row has a candidate that beats its worst member
(a row takes at most TK per chunk: candidates enter best first; once the running sets have
filled most chunks end after one comparison). Order: score descending, then j ascending;
chunks are visited in ascending j, so a candidate must strictly beat the worst member (which
has a lower j) to enter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepkern.reference.sparse_attention import assemble_indices, num_blocks

from ._launch import launch

MAX_TOPK = 64  # running sets live in registers: [BM, next_pow2(topk)] scores + ids
# Key blocks per chunk. Rounds while some row takes, 128-block chunks, longest rows first,
# against TK rounds whenever any row takes over 64-block chunks in launch order (H100, top-k
# kernel alone, .dev/sel_keys.py, the same indices): S = 8K 27 vs 34 us, 32K 128 vs 147, 64K
# 361 vs 356, 128K 993 vs 1237. (Ranking by one int64 key per (score, j), one reduction per
# side instead of three, was slower: 128K 1024-1297 us, 64K 388-474. A pre-pass computing a
# per-row score threshold from 16-block slice maxima, so the rounds see fewer candidates, was
# slower too: it repeats the score dot, 128K 1748-1989 us.)
BC = 128
# The score dot runs as 3xTF32 on the tensor cores (fp32 accuracy: tf32 hi/lo splits): H100,
# top-k kernel alone, B=1 Hkv=8 D=128 causal, against fp32 FMA ("ieee"), the same indices at
# every row: S = 8K 24 vs 27 us, 32K 72 vs 128, 64K 187 vs 352, 128K 470 vs 937. Plain tf32
# (128K 372 us) changed 120 of 16384 rows.
SCORE_PRECISION = "tf32x3"


def rows_per_program(nb: int, n_bh: int, tk: int) -> int:
    """Query blocks per top-k program. With tensor-core scores a 64-row program reuses each
    key chunk 4x as often as a 16-row one, but needs ~one program per SM to fill the GPU.
    H100, tf32x3, B=1 Hkv=8, BM 16 / 32 / 64 (4 warps; 8 warps slower everywhere): S = 8K 24 /
    32 / 30 us, 32K 72 / 87 / 82 (64 programs at BM=64), 64K 187 / 167 / 124 (128 programs),
    128K 470 / 436 / 350; non-causal 32K 72 / 87 / 85. Running sets past 32 slots stay at 16
    rows (registers: [BM, TK] scores and ids next to the [BM, BC] chunk)."""
    if tk <= 32 and triton.cdiv(nb, 64) * n_bh >= 128:
        return 64
    return 16


LOWEST = tl.constexpr(-3.4028234663852886e38)  # NaN / -inf scores rank as the lowest float


@triton.jit
def _pool_kernel(
    Q, K, QS, KS, BIG,
    S, nb, Hkv,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    q_scale,
    G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = bh % Hkv
    t = tl.arange(0, BS)
    d = tl.arange(0, D)
    pos = j * BS + t
    valid = (pos < S)[:, None]
    pos64 = pos.to(tl.int64)
    count = tl.minimum(S - j * BS, BS).to(tl.float32)
    k_ptr = K + b * stride_kb + pos64[:, None] * stride_ks + h * stride_kh + d[None, :]
    k_sum = tl.sum(tl.load(k_ptr, mask=valid, other=0.0).to(tl.float32), axis=0)
    q_sum = tl.zeros([D], dtype=tl.float32)
    # G is a compile-time constant so the loop unrolls and the G loads are in flight at once
    # (a runtime loop waits for each head's tile before loading the next).
    for g in tl.static_range(G):
        head = h * G + g
        q_ptr = Q + b * stride_qb + pos64[:, None] * stride_qs + head * stride_qh + d[None, :]
        q_sum += tl.sum(tl.load(q_ptr, mask=valid, other=0.0).to(tl.float32), axis=0)
    row = bh.to(tl.int64) * nb + j
    k_mean = k_sum / count
    q_mean = q_sum / (count * G) * q_scale
    tl.store(KS + row * D + d, k_mean)
    tl.store(QS + row * D + d, q_mean)
    # Bit 0: the key summary has an entry past 1e38 (inf included), bit 1: the query summary
    # (see _topk_kernel).
    k_big = tl.max((tl.abs(k_mean) > 1e38).to(tl.int32), axis=0)
    q_big = tl.max((tl.abs(q_mean) > 1e38).to(tl.int32), axis=0)
    tl.store(BIG + row, (k_big | (q_big << 1)).to(tl.int8))


@triton.jit
def _insert_best(cur, rs, rj, jmat, slot, best, worst, take, TK: tl.constexpr):
    """One round: in each row that `take`s, the best remaining candidate (score `best`, lowest
    j among equals) replaces the worst member of the running set (lowest score, then highest
    j, then lowest slot) and leaves the candidates."""
    best_j = tl.min(tl.where(cur == best[:, None], jmat, 2147483647), axis=1)
    is_worst = rs == worst[:, None]
    worst_j = tl.max(tl.where(is_worst, rj, -2), axis=1)
    worst_slot = tl.min(tl.where(is_worst & (rj == worst_j[:, None]), slot[None, :], TK), axis=1)
    hit = take[:, None] & (slot[None, :] == worst_slot[:, None])
    rs = tl.where(hit, best[:, None], rs)
    rj = tl.where(hit, best_j[:, None], rj)
    cur = tl.where(take[:, None] & (jmat == best_j[:, None]), -float("inf"), cur)
    return cur, rs, rj


@triton.jit
def _fma_scores(QS, KS, i, jj, nb, D: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """[BM, BC] scores qs[i] . ks[jj] as fp32 FMAs over the D columns."""
    s = tl.zeros([BM, BC], dtype=tl.float32)
    for c in range(D):
        qc = tl.load(QS + i * D + c, mask=i < nb, other=0.0)
        kc = tl.load(KS + jj * D + c, mask=jj < nb, other=0.0)
        s += qc[:, None] * kc[None, :]
    return s


@triton.jit
def _topk_kernel(
    QS, KS, BIG, OUT,
    nb, topk, sink, local, width,
    CAUSAL: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
    TK: tl.constexpr, WC: tl.constexpr, LONGEST_FIRST: tl.constexpr,
    PRECISION: tl.constexpr, FMA: tl.constexpr,
):
    if LONGEST_FIRST:
        # Launch order by descending query block across all (batch, kv head): causal, the last
        # blocks stream the most key blocks, and started last they formed the tail. H100, top-k
        # kernel alone, S = 128K: 992 vs 1050 us (query blocks reversed per kv head only: 999);
        # .dev/sel_order.py.
        n_bh = tl.num_programs(1)
        flat = tl.program_id(0) * n_bh + tl.program_id(1)
        pid = tl.num_programs(0) - 1 - flat // n_bh
        bh = (flat % n_bh).to(tl.int64)
    else:
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
    i = pid * BM + tl.arange(0, BM)
    if CAUSAL:
        j_end = tl.minimum(nb, pid * BM + BM - local)  # candidates satisfy j <= i - local
    else:
        j_end = nb
    # 3xTF32 splits x into hi + (x - hi): a summary entry past ~1e38 (hi rounds to inf) would
    # score NaN instead of +-inf or its value. A second launch (FMA=True) redoes the programs
    # whose query rows or candidate key blocks have one (bit 1 / bit 0 of BIG) with fp32 FMA
    # scores, overwriting their rows; its other programs store nothing. The tensor-core launch
    # knows nothing of this: with the FMA code behind a branch in it, per chunk or around the
    # loop, or with its programs skipping the flagged ones, it ran 10-45% slower even when no
    # summary was flagged (H100 top-k, 32K 73 -> 98 us; 128K 351 -> 394, 391, 386).
    if FMA:
        big = tl.max(tl.load(BIG + bh * nb + i, mask=i < nb, other=0) & 2, axis=0)
        for j0 in range(0, j_end, 1024):
            jb = j0 + tl.arange(0, 1024)
            big |= tl.max(tl.load(BIG + bh * nb + jb, mask=(jb >= sink) & (jb < j_end), other=0) & 1, axis=0)
        _topk_rows(QS, KS, OUT, bh, i, tl.where(big != 0, j_end, sink), big != 0, nb, topk, sink,
                   local, width, CAUSAL, D, BM, BC, TK, WC, True, PRECISION)
    else:
        _topk_rows(QS, KS, OUT, bh, i, j_end, True, nb, topk, sink, local, width,
                   CAUSAL, D, BM, BC, TK, WC, False, PRECISION)


@triton.jit
def _topk_rows(QS, KS, OUT, bh, i, j_end, store, nb, topk, sink, local, width,
               CAUSAL: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
               TK: tl.constexpr, WC: tl.constexpr, FMA: tl.constexpr, PRECISION: tl.constexpr):
    """Query blocks i of (batch, kv head) bh: stream the candidate key blocks [sink, j_end)
    in chunks of BC, keep each row's best topk, store the rows' indices if `store`."""
    d = tl.arange(0, D)
    base = bh * nb * D
    qs = tl.load(QS + base + i[:, None] * D + d[None, :], mask=(i < nb)[:, None], other=0.0)
    slot = tl.arange(0, TK)
    # Slots >= topk hold +inf so they are never the worst member (never replaced).
    rs = tl.where(slot[None, :] < topk, -float("inf"), float("inf")) + tl.zeros([BM, TK], tl.float32)
    rj = tl.full([BM, TK], -1, tl.int32)
    for j0 in range(sink, j_end, BC):
        jj = j0 + tl.arange(0, BC)
        if FMA:
            s = _fma_scores(QS + base, KS + base, i, jj, nb, D, BM, BC)
        else:
            ks = tl.load(KS + base + jj[:, None] * D + d[None, :], mask=(jj < nb)[:, None], other=0.0)
            s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION)
        s = tl.where(s != s, LOWEST, s)
        s = tl.maximum(s, LOWEST)
        cand = (jj[None, :] < nb) & (i[:, None] < nb)
        if CAUSAL:
            cand = cand & (jj[None, :] <= i[:, None] - local)
        else:
            cand = cand & (jj[None, :] != i[:, None])
        cur = tl.where(cand, s, -float("inf"))
        jmat = jj[None, :] + tl.zeros([BM, BC], tl.int32)
        best = tl.max(cur, axis=1)
        worst = tl.min(rs, axis=1)
        take = best > worst
        while tl.sum(take.to(tl.int32), axis=0) > 0:
            cur, rs, rj = _insert_best(cur, rs, rj, jmat, slot, best, worst, take, TK)
            best = tl.max(cur, axis=1)
            worst = tl.min(rs, axis=1)
            take = best > worst
    _store_row_indices(OUT, bh, i, store, rj, nb, sink, local, width, CAUSAL, TK, WC)


@triton.jit
def _store_row_indices(OUT, bh, i, store, rj, nb, sink, local, width, CAUSAL: tl.constexpr,
                       TK: tl.constexpr, WC: tl.constexpr):
    """Row i of the output: its sink blocks, its top-k choices `rj` (-1 = none, any order)
    and its local blocks, ascending, then -1 up to `width`. Every candidate j lies in
    [sink, i - local] (causal) or [sink, nb) without i, so the sinks come first and, causal,
    the local blocks last; non-causal, block i goes between the choices below and above it.
    Each part is stored at its own columns (no two stores share an address)."""
    row = OUT + (bh * nb + i[:, None]) * width
    ok = (i < nb) & store
    key = tl.sort(tl.where(rj >= 0, rj, 2147483647), dim=1)  # choices ascending, none last
    n_top = tl.sum((rj >= 0).to(tl.int32), axis=1)
    if CAUSAL:
        n_sink = tl.minimum(sink, i + 1)
        lo = tl.maximum(i - local + 1, sink)  # local blocks below `sink` are sinks already
        n_local = tl.maximum(i + 1 - lo, 0)
    else:
        n_sink = tl.minimum(sink, nb) + tl.zeros_like(i)
        lo = i
        n_local = ((i >= sink) & (local > 0)).to(tl.int32)
    r = tl.arange(0, TK)[None, :]
    pos = n_sink[:, None] + r
    if not CAUSAL:  # block i after the choices below it
        pos += (key > i[:, None]).to(tl.int32) * n_local[:, None]
    tl.store(row + pos, key, mask=ok[:, None] & (r < n_top[:, None]))
    if CAUSAL:
        local_at = n_sink + n_top
    else:
        local_at = n_sink + tl.sum(((key < i[:, None]) & (r < n_top[:, None])).to(tl.int32), axis=1)
    total = n_sink + n_top + n_local
    for c0 in range(0, width, WC):  # sinks, local blocks and the -1 padding, WC columns a time
        c = c0 + tl.arange(0, WC)[None, :]
        in_local = (c >= local_at[:, None]) & (c < local_at[:, None] + n_local[:, None])
        val = tl.where(c < n_sink[:, None], c, tl.where(in_local, lo[:, None] + c - local_at[:, None], -1))
        mine = (c < n_sink[:, None]) | in_local | (c >= total[:, None])
        tl.store(row + c, val, mask=ok[:, None] & mine & (c < width))


def block_summaries(q, k, block_size: int, softmax_scale: float):
    """(qs, ks, big): summaries fp32 [B*Hkv, nb, D], qs carrying softmax_scale; big int8
    [B*Hkv, nb]: bit 0 set where ks has an entry past 1e38 in magnitude, bit 1 where qs has."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    nb = num_blocks(S, block_size)
    qs = torch.empty((B * Hkv, nb, D), dtype=torch.float32, device=q.device)
    ks = torch.empty((B * Hkv, nb, D), dtype=torch.float32, device=q.device)
    big = torch.empty((B * Hkv, nb), dtype=torch.int8, device=q.device)
    if nb > 0 and B > 0:
        launch(_pool_kernel, (nb, B * Hkv),
               (q, k, qs, ks, big, S, nb, Hkv,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                softmax_scale),
               dict(G=Hq // Hkv, BS=block_size, D=D), num_warps=4)
    return qs, ks, big


def select_blocks(q, k, block_size: int, topk: int, sink_blocks: int, local_blocks: int,
                  causal: bool, softmax_scale: float) -> torch.Tensor:
    """int32 [B, Hkv, nb, sink_blocks + local_blocks + topk]; q, k with unit last stride,
    float16/bfloat16, D in {64, 128}, topk <= MAX_TOPK."""
    B, S, _, D = q.shape
    Hkv = k.shape[2]
    nb = num_blocks(S, block_size)
    if topk == 0 or nb == 0 or B == 0:
        top = torch.empty((B, Hkv, nb, 0), dtype=torch.int32, device=q.device)
        return assemble_indices(top, nb, sink_blocks, local_blocks, causal)
    width = sink_blocks + local_blocks + topk
    out = torch.empty((B, Hkv, nb, width), dtype=torch.int32, device=q.device)
    qs, ks, big = block_summaries(q, k, block_size, softmax_scale)
    tk = max(2, triton.next_power_of_2(topk))
    # Every program on the tensor cores, then the FMA launch for those with huge summaries,
    # in 16-row programs whatever the first launch used (with nothing flagged, H100: 3 us; 64-row
    # programs 12 us at 64K and 128K).
    for fma, bm in ((False, rows_per_program(nb, B * Hkv, tk)), (True, 16)):
        launch(_topk_kernel, (triton.cdiv(nb, bm), B * Hkv),
               (qs, ks, big, out, nb, topk, sink_blocks, local_blocks, width),
               dict(CAUSAL=causal, D=D, BM=bm, BC=BC, TK=tk, WC=32, LONGEST_FIRST=causal,
                    PRECISION=SCORE_PRECISION, FMA=fma), num_warps=4)
    return out
