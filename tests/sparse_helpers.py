"""Shared helpers of the sparse_attention tests (test_sparse_attention.py: the attention;
test_sparse_selection.py: the block selection)."""

import torch

from deepkern.reference.sparse_attention import block_summaries_ref, select_blocks_ref


def sparse_inputs(B, S, Hq, Hkv, D, dtype, device, grad=False):
    q = torch.randn(B, S, Hq, D).to(dtype).to(device)
    k = torch.randn(B, S, Hkv, D).to(dtype).to(device)
    v = torch.randn(B, S, Hkv, D).to(dtype).to(device)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def exact_inputs(B, S, Hq, Hkv, D, device):
    """q and k of small integers (fp16, |v| <= 4): with whole power-of-two blocks, every
    summary, the scale 1/8 (D=64) and every score are exact in fp32 (and in the kernels'
    3xTF32 dots), so bit-identical blocks tie exactly under any summation order. Random
    floats do not: a CPU matmul rounds its tail columns differently (torch 2.14.1's einsum,
    the interpreter's numpy dot), breaking ties by one ulp."""
    q = torch.randint(-4, 5, (B, S, Hq, D)).half().to(device)
    k = torch.randint(-4, 5, (B, S, Hkv, D)).half().to(device)
    return q, k


def nblocks(S, bs):
    return (S + bs - 1) // bs


def check_format(idx, nb, causal):
    """Rows ascending, valid ids first then -1, no repeats, in range, causal: j <= i."""
    valid = idx >= 0
    assert not (~valid[..., :-1] & valid[..., 1:]).any(), "a -1 before a valid id"
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all(), "not strictly ascending"
    assert (idx < nb).all() and (idx >= -1).all()
    if causal:
        assert (idx <= torch.arange(nb, device=idx.device)[:, None]).all(), "causal row lists j > i"


def check_selection(idx, q, k, bs, topk, sink, local, causal, scale, max_diff_rows=0.02):
    """idx equals the fp64 reference selection except in rows where the kernel's fp32 scores
    broke a near-tie differently: there the displaced blocks must score within a tight bound
    of the ones picked instead."""
    nb = nblocks(q.shape[1], bs)
    ref = select_blocks_ref(q.double(), k.double(), bs, topk, sink, local, causal, scale)
    idx, ref = idx.cpu(), ref.cpu()
    assert idx.dtype == torch.int32 and idx.shape == ref.shape, (idx.shape, ref.shape)
    check_format(idx, nb, causal)
    differ = (idx != ref).any(-1).nonzero().tolist()
    if not differ:
        return
    assert len(differ) <= max(1, max_diff_rows * idx[..., 0].numel()), f"{len(differ)} rows differ"
    qs, ks = block_summaries_ref(q.double().cpu(), k.double().cpu(), bs, scale)
    for b, h, i in differ:
        got = set(idx[b, h, i].tolist()) - {-1}
        want = set(ref[b, h, i].tolist()) - {-1}
        assert len(got) == len(want), f"row {(b, h, i)}: {sorted(got)} vs {sorted(want)}"
        score = {j: (qs[b, h, i] @ ks[b, h, j]).item() for j in got | want}
        worst_got = min(score[j] for j in got - want)
        best_missed = max(score[j] for j in want - got)
        tol = 1e-5 * (1 + max(abs(s) for s in score.values()))
        assert worst_got >= best_missed - tol, f"row {(b, h, i)}: picked {worst_got} over {best_missed}"


SMALL = [  # B, S, Hq, Hkv, bs, topk, sink, local, causal
    (1, 200, 4, 2, 32, 2, 1, 2, True),
    (2, 150, 2, 2, 32, 1, 1, 1, False),
    (1, 161, 4, 1, 32, 3, 0, 1, True),
    (1, 130, 2, 1, 64, 1, 0, 1, False),
    (1, 1, 2, 1, 32, 2, 1, 2, True),
    (1, 64, 2, 2, 32, 1, 1, 1, True),
    (1, 300, 2, 1, 128, 1, 1, 1, True),
]
