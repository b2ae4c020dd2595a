"""Triton kernels for block-sparse attention (forward, backward) and their launchers.
Semantics: deepkern.reference.sparse_attention; the block selection is in
sparse_attention_select.py.

Contract of the launchers (the op layer guarantees it): q [B, S, Hq, D], k/v [B, S, Hkv, D],
float16/bfloat16, unit last stride (other strides free), D in {64, 128}; `indices` int32
[B, Hkv, nb, W] in clean form: each row's valid block ids ascending first, -1 after, and in
causal mode no j > i. In that form only a row's LAST valid entry can need a mask (the causal
diagonal block, or the partial last key block), so the main loops run unmasked; out-of-range
ids are clamped, so malformed indices give wrong numbers but never a bad memory access.

Forward: a program owns query block i of one (batch, kv head) and all G query heads of it:
the Q tile stacks HPP heads x block_size tokens as rows (token-major, so each token's HPP
heads are one contiguous load), and loops over the G / HPP head chunks; each listed KV block
is thus read from DRAM about once per group (repeats hit L2; odd chunks walk the list
backwards, starting where the chunk before ended). Online softmax in the exp2 domain,
fp32 accumulation; the log-sum-exp is saved in log2 units (+inf for rows without keys, so
the backward's exp2(s - lse) is 0 there).

Backward: the dq kernel walks the same lists (and stores delta = rowsum(dO * O) first); the
dk/dv kernel walks, for each key block, the query blocks that listed it (a CSR transpose built
by a sort: deterministic, no atomics); each program owns one key block's dk/dv and sums its
contributions in a fixed order. Lists longer than a bound (the sink blocks' lists hold every
query block) are split into parts run by separate programs, launched first; each part writes
fp32 partial sums that a second small kernel adds in part order (the same bits run to run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cuda_facts
from ._launch import launch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: pointer loads only
    TensorDescriptor = None

LOG2E = 1.4426950408889634
# Rows (heads x tokens) of the Q tile per step; the group's heads beyond that are looped.
# H100, S = 32K (Hq 32, Hkv 8, block 64, D 128), backward: dq tiles of 128 rows 9.5 ms vs 64
# rows 12.5. (dk/dv tiles of 128 rows were slower in a chunked variant of the dk/dv kernel,
# not re-measured on this one; the forward's 128 is the Triton FA tutorial's first choice.)
MAX_ROWS_FWD = 128
MAX_ROWS_DQ = 128
MAX_ROWS_DKDV = 64


@triton.jit
def _count_valid(IDX_ROW, W, BW: tl.constexpr):
    n = 0
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        n += tl.sum((tl.load(IDX_ROW + w, mask=w < W, other=-1) >= 0).to(tl.int32), axis=0)
    return n


@triton.jit
def _list_entry(idx_row, w, n, rev, nb):
    """Key block of step w over a row's first n - 1 entries (its last, masked entry runs before
    them): forwards, or backwards when rev, clamped into [0, nb). The forward and dq kernels
    take odd head chunks backwards, so they start on the blocks the chunk before read last,
    the likeliest still in L2 (docs/perf-notes/sparse_attention.md, sessions (q) and (r))."""
    j = tl.load(idx_row + w + rev * (n - 2 - 2 * w))
    return tl.minimum(tl.maximum(j, 0), nb - 1)


@triton.jit
def _load_kv(K, V, KD, VD, k_base, v_base, stride_ks, stride_vs, j, tt, d, S, kv_row, kv_col,
             BS: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """Key block j's K and V tiles [BS, D] and which of its positions lie inside the sequence.
    TMA (unmasked blocks only: they lie wholly inside the sequence): tensor-map copies from
    the [B*S, Hkv*D] views, row kv_row + j * BS, column kv_col."""
    kpos = j * BS + tt
    kval = kpos < S
    if TMA and not MASK:
        k = KD.load([kv_row + j * BS, kv_col])
        v = VD.load([kv_row + j * BS, kv_col])
    else:
        kpos64 = kpos.to(tl.int64)
        k = tl.load(K + k_base + kpos64[:, None] * stride_ks + d[None, :], mask=kval[:, None], other=0.0)
        v = tl.load(V + v_base + kpos64[:, None] * stride_vs + d[None, :], mask=kval[:, None], other=0.0)
    return k, v, kpos, kval


@triton.jit
def _fwd_step(q, acc, m_i, l_i, K, V, KD, VD, k_base, v_base, stride_ks, stride_vs, j, tt, d,
              qpos, S, kv_row, kv_col, qk_scale, use,
              BS: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    k, v, kpos, kval = _load_kv(K, V, KD, VD, k_base, v_base, stride_ks, stride_vs, j, tt, d, S,
                                kv_row, kv_col, BS, MASK, TMA)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK:
        keep = kval[None, :] & use
        if CAUSAL:
            keep = keep & (kpos[None, :] <= qpos[:, None])
        s = tl.where(keep, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen no key yet keep m = -inf; exp2 against 0 then gives p = alpha = 0.
    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KD, VD, IDX, O, LSE,
    S, nb, W, Hq, Hkv, G,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    qk_scale,
    CAUSAL: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, HPP: tl.constexpr,
    BW: tl.constexpr, TMA: tl.constexpr,
):
    i = nb - 1 - tl.program_id(0)  # causal: late query blocks list the most blocks; run them first
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = bh % Hkv
    r = tl.arange(0, HPP * BS)
    t = r // HPP
    g = r % HPP
    tt = tl.arange(0, BS)
    d = tl.arange(0, D)
    qpos = i * BS + t
    qval = qpos < S
    qpos64 = qpos.to(tl.int64)
    idx_row = IDX + (bh.to(tl.int64) * nb + i) * W
    n = _count_valid(idx_row, W, BW)
    j_last = tl.load(idx_row + tl.maximum(n - 1, 0))
    j_last = tl.minimum(tl.maximum(j_last, 0), nb - 1)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    kv_row = (b * S).to(tl.int32)  # TMA views: row of (b, key 0), column of head h
    kv_col = h * D
    for c in range(0, G, HPP):
        head = h * G + c + g
        q_ptr = Q + b * stride_qb + qpos64[:, None] * stride_qs + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr, mask=qval[:, None], other=0.0)
        acc = tl.zeros([HPP * BS, D], dtype=tl.float32)
        m_i = tl.full([HPP * BS], -float("inf"), tl.float32)
        l_i = tl.zeros([HPP * BS], dtype=tl.float32)
        # The masked block first, then the others in _list_entry's order. H100, bench config,
        # given indices, against every chunk forwards with the masked block last: 32K / 64K /
        # 128K 1732 / 3659 / 7731 -> 1698 / 3521 / 7438 us; DRAM reads at 128K 6.9 -> 5.1 GB.
        acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, K, V, KD, VD, k_base, v_base, stride_ks,
                                  stride_vs, j_last, tt, d, qpos, S, kv_row, kv_col, qk_scale, n > 0,
                                  BS=BS, MASK=True, CAUSAL=CAUSAL, TMA=TMA)
        rev = (c // HPP) % 2
        for w in range(n - 1):
            j = _list_entry(idx_row, w, n, rev, nb)
            acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, K, V, KD, VD, k_base, v_base, stride_ks,
                                      stride_vs, j, tt, d, qpos, S, kv_row, kv_col, qk_scale, True,
                                      BS=BS, MASK=False, CAUSAL=CAUSAL, TMA=TMA)
        # l == 0: no key at all -> output 0, lse +inf. A NaN l stays NaN (propagates).
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        m_use = tl.where(m_i == -float("inf"), 0.0, m_i)
        lse = tl.where(empty, float("inf"), m_use + tl.log2(tl.where(empty, 1.0, l_i)))
        row = (b * S + qpos64) * Hq + head
        tl.store(O + row[:, None] * D + d[None, :], out.to(O.dtype.element_ty), mask=qval[:, None])
        tl.store(LSE + row, lse, mask=qval)


@triton.jit
def _dq_step(q, do, dq, lse, delta, K, V, KD, VD, k_base, v_base, stride_ks, stride_vs, j, tt, d,
             qpos, S, kv_row, kv_col, qk_scale, use,
             BS: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    k, v, kpos, kval = _load_kv(K, V, KD, VD, k_base, v_base, stride_ks, stride_vs, j, tt, d, S,
                                kv_row, kv_col, BS, MASK, TMA)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASK:
        keep = kval[None, :] & use
        if CAUSAL:
            keep = keep & (kpos[None, :] <= qpos[:, None])
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _dq_kernel(
    Q, K, V, KD, VD, O, DO, LSE, DELTA, DQ, IDX,
    S, nb, W, Hq, Hkv, G,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, HPP: tl.constexpr,
    BW: tl.constexpr, TMA: tl.constexpr,
):
    i = nb - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = bh % Hkv
    r = tl.arange(0, HPP * BS)
    t = r // HPP
    g = r % HPP
    tt = tl.arange(0, BS)
    d = tl.arange(0, D)
    qpos = i * BS + t
    qval = qpos < S
    qpos64 = qpos.to(tl.int64)
    idx_row = IDX + (bh.to(tl.int64) * nb + i) * W
    n = _count_valid(idx_row, W, BW)
    j_last = tl.load(idx_row + tl.maximum(n - 1, 0))
    j_last = tl.minimum(tl.maximum(j_last, 0), nb - 1)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    kv_row = (b * S).to(tl.int32)  # TMA views: row of (b, key 0), column of head h
    kv_col = h * D
    for c in range(0, G, HPP):
        head = h * G + c + g
        row = (b * S + qpos64) * Hq + head
        q = tl.load(Q + b * stride_qb + qpos64[:, None] * stride_qs + head[:, None] * stride_qh
                    + d[None, :], mask=qval[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + qpos64[:, None] * stride_dos + head[:, None] * stride_doh
                     + d[None, :], mask=qval[:, None], other=0.0)
        o = tl.load(O + row[:, None] * D + d[None, :], mask=qval[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(DELTA + row, delta, mask=qval)
        lse = tl.load(LSE + row, mask=qval, other=float("inf"))
        # As the forward: the masked block first, then _list_entry's order. H100, bench config,
        # whole backward on given indices against forwards with the masked block last, 2 paired
        # rounds: 64K 13.19-13.69 -> 12.55-12.83 ms, 128K 27.36-27.84 -> 25.93-26.76 ms.
        dq = tl.zeros([HPP * BS, D], dtype=tl.float32)
        dq = _dq_step(q, do, dq, lse, delta, K, V, KD, VD, k_base, v_base, stride_ks, stride_vs,
                      j_last, tt, d, qpos, S, kv_row, kv_col, qk_scale, n > 0,
                      BS=BS, MASK=True, CAUSAL=CAUSAL, TMA=TMA)
        rev = (c // HPP) % 2
        for w in range(n - 1):
            j = _list_entry(idx_row, w, n, rev, nb)
            dq = _dq_step(q, do, dq, lse, delta, K, V, KD, VD, k_base, v_base, stride_ks, stride_vs,
                          j, tt, d, qpos, S, kv_row, kv_col, qk_scale, True,
                          BS=BS, MASK=False, CAUSAL=CAUSAL, TMA=TMA)
        tl.store(DQ + row[:, None] * D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=qval[:, None])


@triton.jit
def _dkdv_chunk(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, i, c, b, h, G, Hq, S, kpos, t, g, d,
                stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
                qk_scale, use, BS: tl.constexpr, D: tl.constexpr, HPQ: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    """Query block i, heads h*G + c .. + HPQ: their contribution to this key block's dk, dv.
    TMA: the q and dO tiles by tensor-map copies of [1, BS, HPQ*D] boxes from the [B, S, Hq*D]
    views (rows past S lie outside the box's tensor, so they are zero-filled like the masked
    pointer loads), reshaped to the token-major rows."""
    qpos = i * BS + t
    qval = qpos < S
    qpos64 = qpos.to(tl.int64)
    head = h * G + c + g
    row = (b * S + qpos64) * Hq + head
    if TMA:
        q = tl.reshape(QD.load([b.to(tl.int32), i * BS, (h * G + c) * D]), [HPQ * BS, D])
        do = tl.reshape(DOD.load([b.to(tl.int32), i * BS, (h * G + c) * D]), [HPQ * BS, D])
    else:
        q = tl.load(Q + b * stride_qb + qpos64[:, None] * stride_qs + head[:, None] * stride_qh
                    + d[None, :], mask=qval[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + qpos64[:, None] * stride_dos
                     + head[:, None] * stride_doh + d[None, :], mask=qval[:, None], other=0.0)
    # Padded query rows: lse = +inf gives p = 0, and dO = 0 there.
    lse = tl.load(LSE + row, mask=qval, other=float("inf"))
    delta = tl.load(DELTA + row, mask=qval, other=0.0)
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BS keys, rows]
    if MASK:
        keep = (kpos[:, None] >= 0) & use
        if CAUSAL:
            keep = keep & (kpos[:, None] <= qpos[None, :])
        p_t = tl.where(keep, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, QD, DOD, LSE, DELTA, DK, DV, PART, OFFS, QLIST, WORK,
    S, nb, Hq, Hkv, G,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, HPQ: tl.constexpr,
    TMA: tl.constexpr,
):
    # Work item: (segment, its entries lo:hi, partial-sum slot or -1); see _dkdv_work.
    w = WORK + tl.program_id(0) * 4
    seg = tl.load(w)
    if seg < 0:  # past the last work item
        return
    lo = tl.load(w + 1)
    hi = tl.load(w + 2)
    slot = tl.load(w + 3)
    j = seg % nb
    bh = seg // nb
    b = (bh // Hkv).to(tl.int64)
    h = bh % Hkv
    tt = tl.arange(0, BS)
    d = tl.arange(0, D)
    r = tl.arange(0, HPQ * BS)
    t = r // HPQ
    g = r % HPQ
    kpos = j * BS + tt
    kval = kpos < S
    kpos64 = kpos.to(tl.int64)
    k = tl.load(K + b * stride_kb + kpos64[:, None] * stride_ks + h * stride_kh + d[None, :],
                mask=kval[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + kpos64[:, None] * stride_vs + h * stride_vh + d[None, :],
                mask=kval[:, None], other=0.0)
    dk = tl.zeros([BS, D], dtype=tl.float32)
    dv = tl.zeros([BS, D], dtype=tl.float32)
    start = tl.load(OFFS + seg)
    end = tl.load(OFFS + seg + 1)
    # Lists are ascending in i and (causal) start at i >= j: only a list's first entry can be
    # the diagonal block, so only it carries the mask (in the first part; later parts skip it).
    first = lo == start
    has = first & (start < end)
    i0 = tl.load(QLIST + start, mask=has, other=0)
    for c in range(0, G, HPQ):
        dk, dv = _dkdv_chunk(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, i0, c, b, h, G, Hq, S, kpos,
                             t, g, d, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos,
                             stride_doh, qk_scale, has, BS=BS, D=D, HPQ=HPQ, MASK=True,
                             CAUSAL=CAUSAL, TMA=False)
    # One loop over (entry, head chunk) pairs, not entries with an inner loop over chunks:
    # the software pipeline then prefetches across entries. H100, whole backward at 32K
    # (bench config): this loop with 4 warps 7.6 ms; nested loops 9.0 (8 warps) / 9.5 (4);
    # this loop with 8 warps 9.8 (.dev/dkdv_sweep.py).
    nc = G // HPQ
    for s in range((lo + first.to(lo.dtype)) * nc, hi * nc):
        e = s // nc
        c = ((s - e * nc) * HPQ).to(tl.int32)
        i = tl.load(QLIST + e)
        dk, dv = _dkdv_chunk(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, i, c, b, h, G, Hq, S, kpos,
                             t, g, d, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos,
                             stride_doh, qk_scale, True, BS=BS, D=D, HPQ=HPQ, MASK=False,
                             CAUSAL=CAUSAL, TMA=TMA)
    if slot >= 0:  # one part of a split list: fp32 partial sums, added up by _dkdv_reduce
        o = (slot.to(tl.int64) * 2 * BS + tt[:, None]) * D + d[None, :]
        tl.store(PART + o, dk)
        tl.store(PART + o + BS * D, dv)
    else:
        _store_dkdv(DK, DV, dk, dv, b, h, j, S, Hkv, sm_scale, BS, D)


@triton.jit
def _dkdv_reduce(DK, DV, PART, SPLIT, S, nb, Hkv, sm_scale, BS: tl.constexpr, D: tl.constexpr):
    """dk, dv of a split list: its parts' partial sums added in part order (deterministic)."""
    w = SPLIT + tl.program_id(0) * 3
    seg = tl.load(w)
    if seg < 0:
        return
    base = tl.load(w + 1).to(tl.int64)
    n = tl.load(w + 2)
    tt = tl.arange(0, BS)
    d = tl.arange(0, D)
    dk = tl.zeros([BS, D], dtype=tl.float32)
    dv = tl.zeros([BS, D], dtype=tl.float32)
    for r in range(n):
        o = ((base + r) * 2 * BS + tt[:, None]) * D + d[None, :]
        dk += tl.load(PART + o)
        dv += tl.load(PART + o + BS * D)
    bh = seg // nb
    _store_dkdv(DK, DV, dk, dv, (bh // Hkv).to(tl.int64), bh % Hkv, seg % nb, S, Hkv, sm_scale,
                BS, D)


@triton.jit
def _store_dkdv(DK, DV, dk, dv, b, h, j, S, Hkv, sm_scale, BS: tl.constexpr, D: tl.constexpr):
    """Key block j's final dk (scaled) and dv into [B, S, Hkv, D], rows past S skipped."""
    kpos = j * BS + tl.arange(0, BS)
    d = tl.arange(0, D)
    row = (b * S + kpos.to(tl.int64)) * Hkv + h
    tl.store(DK + row[:, None] * D + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=(kpos < S)[:, None])
    tl.store(DV + row[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty), mask=(kpos < S)[:, None])


# ------------------------------------------------------------------------------------------
# Launchers


def _heads_per_tile(G: int, block_size: int, max_rows: int) -> int:
    """Largest power of two dividing G with heads x block_size <= max_rows (at least 1)."""
    hpp = 1
    while G % (hpp * 2) == 0 and hpp * 2 * block_size <= max_rows:
        hpp *= 2
    return hpp


def _tma_views_ok(t: torch.Tensor) -> bool:
    """t [B, S, H, D] can be read through a tensor map over its [B*S, H*D] view: a Hopper or
    newer GPU, heads packed next to each other, batches at S times the token stride, 16-byte
    aligned base and token stride (e.g. k and v sliced out of one packed qkv tensor qualify)."""
    B, S, H, D = t.shape
    return (t.is_cuda and cuda_facts(t.device).major >= 9
            and t.stride(3) == 1 and t.stride(2) == D and t.stride(0) == S * t.stride(1)
            and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
            and B * S < 2**31)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_size: int):
    """(KD, VD): tensor maps over k and v as [B*S, Hkv*D] with [block_size, D] boxes, or
    (None, None) where _tma_views_ok fails (or this Triton has no TensorDescriptor): those
    kernels then load K and V through pointers. H100, forward on given indices (bench config),
    against pointer loads, the same bits: 8K 454 -> 427 us, 32K 1848 -> 1731, 128K 8105 ->
    7695 (.dev/sa_tma_ab.py)."""
    if TensorDescriptor is None or not (_tma_views_ok(k) and _tma_views_ok(v)):
        return None, None
    B, S, Hkv, D = k.shape

    def view(t):
        return TensorDescriptor(t, shape=[B * S, Hkv * D], strides=[t.stride(1), 1],
                                block_shape=[block_size, D])
    return view(k), view(v)


def _batch_descriptors(a: torch.Tensor, b: torch.Tensor, block_size: int, heads: int):
    """Tensor maps over a and b [B, S, H, D] as [B, S, H*D] with [1, block_size, heads*D]
    boxes (a box past S is zero-filled, not the next batch's rows), or (None, None) as in
    _kv_descriptors."""
    if TensorDescriptor is None or not (_tma_views_ok(a) and _tma_views_ok(b)):
        return None, None

    def view(t):
        B, S, H, D = t.shape
        return TensorDescriptor(t, shape=[B, S, H * D], strides=[t.stride(0), t.stride(1), 1],
                                block_shape=[1, block_size, heads * D])
    return view(a), view(b)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _num_blocks(S: int, block_size: int) -> int:
    return (S + block_size - 1) // block_size


def transpose_indices(indices: torch.Tensor, nb: int):
    """CSR transpose of clean indices [B, Hkv, nb, W]: for segment (b*Hkv + h)*nb + j,
    qlist[offs[seg]:offs[seg+1]] are the query blocks i that list j, ascending. One sort of
    unique int64 keys: deterministic, no atomics. Memory O(B * Hkv * nb * W)."""
    B, Hkv, _, W = indices.shape
    bh = B * Hkv
    dev = indices.device
    idx = indices.reshape(bh, nb, W).long()
    seg = torch.arange(bh, device=dev)[:, None, None] * nb + idx.clamp(min=0)
    key = seg * nb + torch.arange(nb, device=dev)[None, :, None]
    key = torch.where(idx >= 0, key, bh * nb * nb).flatten().sort().values  # invalid: at the end
    qlist = (key % nb).to(torch.int32)
    offs = torch.searchsorted(key // nb, torch.arange(bh * nb + 1, device=dev))
    if qlist.numel() == 0:
        qlist = torch.zeros(1, dtype=torch.int32, device=dev)
    return offs, qlist

def _split_length(total: int, W: int, sms: int) -> int:
    """Entries per dk/dv program at most. A list longer than this (the sink blocks' lists hold
    every query block) is split into parts so that no program runs much longer than the
    average: about a quarter of the average work of a resident program (2 per SM), and never
    below 4 W, so that typical lists stay whole. H100, backward at 32K (bench config) without
    sink blocks (same W): 7.6 -> 6.3 ms, the time the sink lists cost."""
    return max(4 * W, -(-total // (4 * 2 * sms)), 1)


# Partial-sum slots of the dk/dv launch at most (fp32 [2, block, D] each: 32 MB at block 64,
# D 128). Lists are split in launch order while slots last; later long lists run whole.
SPLIT_SLOTS = 512


@triton.jit
def _dkdv_plan(OFFS, WORK, SPLIT, nseg, BH, nb, L, slots, BLOCK: tl.constexpr):
    """One program: the work lists of _dkdv_work, scanning the segments in launch order in
    chunks of BLOCK with running totals (rows it does not write stay -1)."""
    done_parts = 0  # work rows written so far
    done_want = 0  # slots that split lists before this chunk asked for
    done_slots = 0  # slots taken
    done_split = 0  # split lists
    for c0 in range(0, nseg, BLOCK):
        x = c0 + tl.arange(0, BLOCK)
        m = x < nseg
        seg = (x % BH) * nb + x // BH  # key-block-major: all (batch, head) lists of block 0 first
        start = tl.load(OFFS + seg, mask=m, other=0).to(tl.int32)
        end = tl.load(OFFS + seg + 1, mask=m, other=0).to(tl.int32)
        parts = (end - start + L - 1) // L
        want = tl.where(m & (parts > 1), parts, 0)
        split = (want > 0) & (done_want + tl.cumsum(want, 0) <= slots)
        parts = tl.where(split, parts, 1)
        parts = tl.where(m, parts, 0)
        first = done_parts + tl.cumsum(parts, 0) - parts  # this segment's first work row
        taken = tl.where(split, parts, 0)
        slot0 = done_slots + tl.cumsum(taken, 0) - taken
        for r in range(0, tl.max(parts, 0)):
            on = m & (r < parts)
            lo = start + r * L
            hi = tl.where(split, tl.minimum(lo + L, end), end)
            row = WORK + (first + r) * 4
            tl.store(row, seg, mask=on)
            tl.store(row + 1, lo, mask=on)
            tl.store(row + 2, hi, mask=on)
            tl.store(row + 3, tl.where(split, slot0 + r, -1), mask=on)
        srow = SPLIT + (done_split + tl.cumsum(split.to(tl.int32), 0) - 1) * 3
        tl.store(srow, seg, mask=split)
        tl.store(srow + 1, slot0, mask=split)
        tl.store(srow + 2, parts, mask=split)
        done_parts += tl.sum(parts, 0)
        done_want += tl.sum(want, 0)
        done_slots += tl.sum(taken, 0)
        done_split += tl.sum(split.to(tl.int32), 0)


def _dkdv_work(offs: torch.Tensor, bh: int, nb: int, L: int, slots: int):
    """Work lists of the dk/dv launch, built on the device by one small kernel (no host sync,
    so CUDA graphs and torch.compile work; a first version in ~60 torch ops cost more host
    time than the whole backward's GPU time at 8K). work int32 [P, 4]: (segment, first and
    end entry in qlist, partial-sum slot or -1) per program, segments in key-block-major
    order so the sink lists start first; split int32 [R, 3]: (segment, first slot, parts)
    per split list. Rows past the last item are -1: P and R are bounds, not the exact
    counts. Lists are split in launch order while the `slots` partial sums last; later long
    lists run whole."""
    nseg = bh * nb
    work = torch.full((nseg + slots, 4), -1, dtype=torch.int32, device=offs.device)
    split = torch.full((max(slots // 2, 1), 3), -1, dtype=torch.int32, device=offs.device)
    launch(_dkdv_plan, (1,), (offs, work, split, nseg, bh, nb, L, slots),
           dict(BLOCK=1024), num_warps=4)
    return work, split


def sparse_attention_fwd(q, k, v, indices, block_size: int, causal: bool, softmax_scale: float):
    """(out [B, S, Hq, D] contiguous, lse [B, S, Hq] fp32 in log2 units)."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    nb = _num_blocks(S, block_size)
    out = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, S, Hq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    indices = indices.contiguous()
    hpp = _heads_per_tile(G, block_size, MAX_ROWS_FWD)
    rows = hpp * block_size
    kd, vd = _kv_descriptors(k, v, block_size)
    launch(_fwd_kernel, (nb, B * Hkv),
           (q, k, v, kd, vd, indices, out, lse, S, nb, indices.shape[-1], Hq, Hkv, G,
            *_strides(q), *_strides(k), *_strides(v), softmax_scale * LOG2E),
           dict(CAUSAL=causal, BS=block_size, D=D, HPP=hpp, BW=32, TMA=kd is not None),
           num_warps=8 if rows * D >= 128 * 128 else 4, num_stages=2)
    return out, lse


def sparse_attention_bwd(dout, q, k, v, out, lse, indices, block_size: int, causal: bool,
                         softmax_scale: float):
    """(dq, dk, dv), contiguous, in q's dtype."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    nb = _num_blocks(S, block_size)
    dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S, Hkv, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, S, Hkv, D), dtype=v.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()  # e.g. the stride-0 gradient of out.sum()
    indices = indices.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((B, S, Hq), dtype=torch.float32, device=q.device)
    qk_scale = softmax_scale * LOG2E
    warps = 8 if D >= 128 else 4
    # 128 x 128 tiles (block 128, D 128): q, dO, k, v tiles alone take 128 KB of shared
    # memory, so no multi-buffering of the loads (it would not fit in 227 KB with scratch).
    stages = 1 if block_size * D >= 128 * 128 else 2
    hpp = _heads_per_tile(G, block_size, MAX_ROWS_DQ)
    kd, vd = _kv_descriptors(k, v, block_size)
    launch(_dq_kernel, (nb, B * Hkv),
           (q, k, v, kd, vd, out, dout, lse, delta, dq, indices, S, nb, indices.shape[-1], Hq, Hkv,
            G, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), qk_scale, softmax_scale),
           dict(CAUSAL=causal, BS=block_size, D=D, HPP=hpp, BW=32, TMA=kd is not None),
           num_warps=warps, num_stages=stages)
    offs, qlist = transpose_indices(indices, nb)
    W = indices.shape[-1]
    total = B * Hkv * nb * W  # entries, padding included
    L = _split_length(total, W, cuda_facts(q.device).sms if q.is_cuda else 132)  # CPU: as H100
    slots = min(SPLIT_SLOTS, max(2 * total // L, 2))  # split lists take < 2 total / L
    work, split = _dkdv_work(offs, B * Hkv, nb, L, slots)
    part = torch.empty((slots, 2, block_size, D), dtype=torch.float32, device=q.device)
    hpq = _heads_per_tile(G, block_size, MAX_ROWS_DKDV)
    qd, dod = _batch_descriptors(q, dout, block_size, hpq)
    launch(_dkdv_kernel, (work.shape[0],),
           (q, k, v, dout, qd, dod, lse, delta, dk, dv, part, offs, qlist, work, S, nb, Hq,
            Hkv, G, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), qk_scale,
            softmax_scale),
           dict(CAUSAL=causal, BS=block_size, D=D, HPQ=hpq, TMA=qd is not None),
           num_warps=4 if block_size * D <= 64 * 128 else 8, num_stages=stages)
    launch(_dkdv_reduce, (split.shape[0],), (dk, dv, part, split, S, nb, Hkv, softmax_scale),
           dict(BS=block_size, D=D), num_warps=4)
    return dq, dk, dv
