"""Reference for block-sparse top-k attention (selection and attention), readable PyTorch.

Layout: q [B, S, Hq, D], k and v [B, S, Hkv, D] (flash-attn layout), Hq a multiple of Hkv;
G = Hq // Hkv query heads share one kv head. Tokens are cut into blocks of `block_size`;
nb = ceil(S / block_size) blocks, the last one possibly partial.

Selection, per (batch b, kv head h, query block i):
    key summary   ks[j] = mean of k over the valid tokens of block j
    query summary qs[i] = mean of q over the valid tokens of block i and the G heads of h
    score(i, j)   = dot(qs[i], ks[j]) * softmax_scale
    causal:     keep the sink blocks j < sink_blocks (j <= i), the local blocks
                i - local_blocks + 1 .. i, then the `topk` best-scoring remaining blocks j < i.
    non-causal: keep the sink blocks, block i itself, then the `topk` best-scoring remaining
                blocks (any j); local_blocks only reserves index slots here.
    Ranking: higher score first; equal scores -> lower j first. A NaN or -inf score ranks as
    the lowest finite float (so it can still be picked when slots remain).
    Result: int32 [B, Hkv, nb, sink_blocks + local_blocks + topk], each row ascending with the
    kept block ids first and -1 after them, no duplicates.

Attention, per query token at position p in block i and query head of kv head h: exact
softmax over the keys of the blocks listed in indices[b, h, i] (entries -1 are empty), with
the causal mask (key position <= p) when causal; so in causal mode a listed j > i adds
nothing. A query with no attendable key gets output 0 (and zero gradients). That cannot
happen with selected indices: block i is always kept, and holds the query itself.
When every block is kept the result is dense (causal) attention.

Arithmetic in fp32 (fp64 for fp64 inputs); differentiable through torch autograd, so it also
serves as the "torch" backend. Memory grows like B * Hq * S * width * block_size (the gathered
scores), not S^2; the selection works on chunks of query blocks (about 2^25 products at a time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INT_MAX = torch.iinfo(torch.int32).max


def num_blocks(seq_len: int, block_size: int) -> int:
    return (seq_len + block_size - 1) // block_size


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, S, H, D] -> [B, H, nb, block_size, D], zero-padded to whole blocks."""
    B, S, H, D = x.shape
    nb = num_blocks(S, block_size)
    x = F.pad(x, (0, 0, 0, 0, 0, nb * block_size - S))
    return x.view(B, nb, block_size, H, D).permute(0, 3, 1, 2, 4)


def block_summaries_ref(q, k, block_size: int, softmax_scale: float | None = None):
    """(qs, ks), each [B, Hkv, nb, D] in fp32 (fp64 for fp64 inputs); qs already carries
    softmax_scale, so score(i, j) = qs[i] . ks[j]."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    ct = _compute_dtype(q)
    nb = num_blocks(S, block_size)
    counts = (S - torch.arange(nb, device=q.device) * block_size).clamp(max=block_size).to(ct)
    ks = _blocked(k.to(ct), block_size).sum(3) / counts[:, None]
    qb = _blocked(q.to(ct), block_size).sum(3)  # [B, Hq, nb, D]
    qs = qb.view(B, Hkv, G, nb, D).sum(2) / (counts[:, None] * G) * scale
    return qs, ks


def sort_valid(indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The entries of `indices` where `valid`, ascending, then -1 (int32, same shape)."""
    key = torch.where(valid, indices.to(torch.int32), _INT_MAX)
    key = key.sort(dim=-1).values
    return torch.where(key == _INT_MAX, -1, key)


def clean_indices(indices: torch.Tensor, causal: bool) -> torch.Tensor:
    """User indices in the kernels' form: valid entries ascending first, -1 after; in causal
    mode entries j > i are dropped (they would add nothing)."""
    valid = indices >= 0
    if causal:
        nb = indices.shape[2]
        valid = valid & (indices <= torch.arange(nb, device=indices.device)[:, None])
    return sort_valid(indices, valid)


def assemble_indices(top: torch.Tensor, nb: int, sink_blocks: int, local_blocks: int,
                     causal: bool) -> torch.Tensor:
    """Adds the sink and local blocks to the top-k choices `top` [B, Hkv, nb, topk] (-1 =
    none, any order) and returns the ascending, -1-padded int32 [B, Hkv, nb, width] rows."""
    B, Hkv = top.shape[:2]
    dev = top.device
    i = torch.arange(nb, device=dev)[:, None]
    sink = torch.arange(sink_blocks, device=dev)[None, :].expand(nb, sink_blocks)
    sink_ok = sink < nb
    if causal:
        sink_ok = sink_ok & (sink <= i)
        local = i - local_blocks + 1 + torch.arange(local_blocks, device=dev)[None, :]
        local_ok = (local >= 0) & (local >= sink_blocks)  # j < sink_blocks: already a sink
    else:
        local = i.expand(nb, local_blocks)
        local_ok = (i >= sink_blocks) & (torch.arange(local_blocks, device=dev)[None, :] == 0)
    fixed = torch.cat([torch.where(sink_ok, sink, -1), torch.where(local_ok, local, -1)], dim=1)
    rows = torch.cat([fixed.to(torch.int32).expand(B, Hkv, nb, -1), top.to(torch.int32)], dim=-1)
    return sort_valid(rows, rows >= 0)


def select_blocks_ref(q, k, block_size: int = 64, topk: int = 16, sink_blocks: int = 1,
                      local_blocks: int = 2, causal: bool = True,
                      softmax_scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """The kept key blocks per (batch, kv head, query block): int32 [B, Hkv, nb, width]."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    nb = num_blocks(S, block_size)
    qs, ks = block_summaries_ref(q, k, block_size, softmax_scale)
    lowest = torch.finfo(qs.dtype).min
    j = torch.arange(nb, device=q.device)
    # Scores as products summed over D, not a matmul: a CPU matmul rounds its tail columns
    # differently (torch 2.14.1: the last of 9 identical key blocks scored one ulp above the
    # others), which breaks exact ties; the sum reduces every (i, j) the same way. Chunks of
    # query blocks keep the product tensor near 2^25 elements.
    chunk = max(1, min(chunk, (1 << 25) // max(1, B * Hkv * nb * qs.shape[-1])))
    tops = []
    for i0 in range(0, nb, chunk):
        i = torch.arange(i0, min(i0 + chunk, nb), device=q.device)[:, None]
        scores = (qs[:, :, i0:i0 + chunk, None, :] * ks[:, :, None, :, :]).sum(-1)
        if causal:
            cand = (j >= sink_blocks) & (j <= i - local_blocks)
        else:
            cand = (j >= sink_blocks) & (j != i)
        scores = torch.where(torch.isnan(scores) | (scores == -math.inf), lowest, scores)
        scores = torch.where(cand, scores, -math.inf)
        # Stable sort: among equal scores the lower j comes first.
        order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :topk]
        picked = torch.gather(cand.expand_as(scores), -1, order)
        top = torch.where(picked, order, -1)
        tops.append(F.pad(top, (0, topk - top.shape[-1]), value=-1))
    top = torch.cat(tops, dim=2) if tops else torch.empty(B, Hkv, 0, topk, dtype=torch.int64,
                                                          device=q.device)
    return assemble_indices(top, nb, sink_blocks, local_blocks, causal)


def sparse_attention_ref(q, k, v, indices, block_size: int = 64, causal: bool = True,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """Attention over the listed key blocks; output [B, S, Hq, D] in q's dtype."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    bs = block_size
    nb = num_blocks(S, bs)
    W = indices.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    ct = _compute_dtype(q)
    dev = q.device

    qb = _blocked(q.to(ct), bs).reshape(B, Hkv, G, nb, bs, D).transpose(2, 3)  # [B,Hkv,nb,G,bs,D]
    kb, vb = _blocked(k.to(ct), bs), _blocked(v.to(ct), bs)  # [B, Hkv, nb, bs, D]
    idx = indices.to(dev).long()
    qblock = torch.arange(nb, device=dev)[:, None]
    valid = idx >= 0
    if causal:
        valid = valid & (idx <= qblock)
    idx = idx.clamp(min=0)
    bi = torch.arange(B, device=dev)[:, None, None, None]
    hi = torch.arange(Hkv, device=dev)[None, :, None, None]
    kg = kb[bi, hi, idx].reshape(B, Hkv, nb, W * bs, D)
    vg = vb[bi, hi, idx].reshape(B, Hkv, nb, W * bs, D)

    scores = torch.einsum("bhngtd,bhnkd->bhngtk", qb, kg) * scale  # [B,Hkv,nb,G,bs,W*bs]
    kpos = (idx[..., None] * bs + torch.arange(bs, device=dev)).reshape(B, Hkv, nb, 1, 1, W * bs)
    keep = (valid[..., None].expand(-1, -1, -1, -1, bs).reshape(B, Hkv, nb, 1, 1, W * bs)
            & (kpos < S))
    if causal:
        qpos = (qblock * bs + torch.arange(bs, device=dev)).view(1, 1, nb, 1, bs, 1)
        keep = keep & (kpos <= qpos)
    scores = scores.masked_fill(~keep, -math.inf)
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = m.masked_fill(m == -math.inf, 0.0)  # rows without keys: p = 0, output 0
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhngtk,bhnkd->bhngtd", p, vg) / torch.where(denom == 0, 1.0, denom)
    out = out.permute(0, 2, 4, 1, 3, 5).reshape(B, nb * bs, Hq, D)[:, :S]
    return out.to(q.dtype)
