"""deepkern.sparse_attention: the Triton kernels against the fp64/fp32 reference (forward, all
gradients), dense-equivalent settings against F.scaled_dot_product_attention, user-given
indices, opcheck, torch.compile, module, bad input. The selection: test_sparse_selection.py.

On a CPU-only machine the kernels run in the Triton interpreter on tiny shapes (fp16; the
interpreter's bf16 tl.dot is broken); the `cuda` tests run the issue's grid in bf16/fp16."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICES
from helpers import REL_TOL, assert_close
from sparse_helpers import SMALL, check_selection, nblocks, sparse_inputs

import deepkern
from deepkern.reference.sparse_attention import select_blocks_ref, sparse_attention_ref


def _ref_outputs(q, k, v, idx, bs, causal, scale, dout, dtype=torch.float64):
    """Reference output and gradients computed in `dtype` from the same (rounded) inputs."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = sparse_attention_ref(*leaves, idx, bs, causal, scale)
    out.backward(dout.to(dtype))
    return out, [t.grad for t in leaves]


def _single_key_gauges(q, k, v, dout, scale):
    """S = 1: every query sees one key (its own), so p = 1 and the exact dq and dk are 0
    (ds = p * (dp - delta) with delta = rowsum(dO * O) = dp). Kernels and an fp32 reference
    both return the rounding left by that cancellation, so ||g - ref|| / ||ref|| would compare
    noise with noise (on the H100 it came out 1 to 4). The size of the cancelled term is the
    yardstick instead: ||scale * dp * k|| for dq and ||scale * dp * q|| for dk (fp64)."""
    qd, kd, vd, dd = (t.detach().double().cpu() for t in (q, k, v, dout))
    G = q.shape[2] // k.shape[2]
    dp = (dd * vd.repeat_interleave(G, dim=2)).sum(-1, keepdim=True) * scale
    return {"dq": (dp * kd.repeat_interleave(G, dim=2)).norm().item(),
            "dk": (dp * qd).norm().item()}


def _assert_vanishes(g, ref, gauge, dtype, what):
    """A gradient that is exactly 0: ||g - ref|| (and the reference's own rounding) within
    the dtype's gradient bound of `gauge`, the size of the terms that cancel."""
    o, r = g.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{what}: non-finite values where the exact value is 0"
    bound = REL_TOL[dtype] * 2.0
    r_norm = r.norm().item()
    assert r_norm <= bound / 2 * gauge, f"{what}: the reference is not ~0 ({r_norm:.3e})"
    err = (o - r).norm().item() / gauge
    assert err <= bound, f"{what}: error {err:.3e} of the cancelled terms > {bound:.1e} ({dtype})"


def _check_fwd_bwd(q, k, v, out, idx, bs, causal, scale, dtype, ref_dtype=torch.float64):
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _ref_outputs(q, k, v, idx, bs, causal, scale, dout, ref_dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, what="out")
    gauges = _single_key_gauges(q, k, v, dout, scale) if q.shape[1] == 1 else {}
    # Gradients chain two low-precision products (p and ds are rounded to the input dtype
    # before their dots): allow twice the output bound.
    for name, g, r, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape
        if name in gauges:
            _assert_vanishes(g, r, gauges[name], dtype, what=name)
        else:
            assert_close(g, r, dtype, scale=2.0, what=name)


# ------------------------------------------------------------------------------------------
# The reference against SDPA


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S, Hq, Hkv", [(100, 4, 2), (64, 2, 2), (1, 4, 1)])
def test_reference_dense_equals_sdpa(causal, S, Hq, Hkv):
    """With every block kept the reference is dense attention. Checked in fp64 (the reference
    functions take it) at the fp64 bound: in fp32 the reference's own rounding reached 1.3e-5
    on the GPU machine's CPU (torch 2.11), 2.5e-7 here, so an fp32 check measured the host's
    float32 kernels, not the semantics. The public torch backend runs the same functions."""
    q, k, v = sparse_inputs(2, S, Hq, Hkv, 16, torch.float64, "cpu")
    nb = nblocks(S, 32)
    idx = select_blocks_ref(q, k, 32, nb, 1, 2, causal)
    out = sparse_attention_ref(q, k, v, idx, 32, causal)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=True).transpose(1, 2)
    assert_close(out, sdpa, torch.float64)
    qf, kf, vf = q.float(), k.float(), v.float()
    public = deepkern.sparse_attention(qf, kf, vf, 32, topk=nb, causal=causal, backend="torch")
    idx32 = select_blocks_ref(qf, kf, 32, nb, 1, 2, causal)
    assert torch.equal(public, sparse_attention_ref(qf, kf, vf, idx32, 32, causal))


def test_reference_rows_without_keys_are_zero():
    q, k, v = sparse_inputs(1, 70, 2, 1, 16, torch.float64, "cpu", grad=True)
    idx = torch.tensor([[[[0, -1], [-1, -1], [2, 1]]]], dtype=torch.int32)  # block 1: none
    out = sparse_attention_ref(q, k, v, idx, 32, causal=True)
    assert (out[:, 32:64] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert (q.grad[:, 32:64] == 0).all() and torch.isfinite(k.grad).all()


# ------------------------------------------------------------------------------------------
# Kernels (CPU through the interpreter: tiny shapes, fp16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: "B{}S{}H{}/{}bs{}k{}s{}l{}{}".format(
    *c[:8], "c" if c[8] else "n"))
def test_forward_backward(device, cfg):
    B, S, Hq, Hkv, bs, topk, sink, local, causal = cfg
    q, k, v = sparse_inputs(B, S, Hq, Hkv, 64, torch.float16, device, grad=True)
    out, idx = deepkern.sparse_attention(q, k, v, bs, topk, sink, local, causal,
                                         return_indices=True, backend="triton")
    assert torch.equal(idx, deepkern.select_blocks(q, k, bs, topk, sink, local, causal,
                                                   backend="triton"))
    _check_fwd_bwd(q, k, v, out, idx.cpu(), bs, causal, 1 / 8, torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq, Hkv", [(2, 2), (4, 1)])
def test_single_token_fp32_reference(device, causal, Hq, Hkv):
    """S = 1 against an fp32 reference, as the GPU grid checks it: the exact dq and dk are 0
    and both sides return rounding noise, which the plain relative error rejected."""
    q, k, v = sparse_inputs(2, 1, Hq, Hkv, 64, torch.float16, device, grad=True)
    out, idx = deepkern.sparse_attention(q, k, v, 64, 3, 1, 2, causal, return_indices=True,
                                         backend="triton")
    _check_fwd_bwd(q, k, v, out, idx.cpu(), 64, causal, 1 / 8, torch.float16,
                   ref_dtype=torch.float32)


def test_single_token_check_rejects_a_wrong_gradient():
    """The S = 1 check must fail for a dq that misses the delta term (= scale * dp * k)."""
    q, k, v = sparse_inputs(1, 1, 4, 2, 64, torch.float64, "cpu")
    dout = torch.randn_like(q)
    gauges = _single_key_gauges(q, k, v, dout, 1 / 8)
    dp = (dout * v.repeat_interleave(2, dim=2)).sum(-1, keepdim=True) / 8
    wrong = (dp * k.repeat_interleave(2, dim=2)).half()
    zero = torch.zeros_like(wrong)
    _assert_vanishes(zero, zero, gauges["dq"], torch.float16, "dq")
    with pytest.raises(AssertionError, match="of the cancelled terms"):
        _assert_vanishes(wrong, zero, gauges["dq"], torch.float16, "dq")
    nan = torch.full_like(zero, float("nan"))
    with pytest.raises(AssertionError, match="non-finite"):
        _assert_vanishes(nan, zero, gauges["dq"], torch.float16, "dq")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_head_chunk_loops(device, causal, monkeypatch):
    """One head per Q tile in every kernel: the group's heads are looped (the path taken when
    heads x block_size exceeds the tile limits, e.g. Hq/Hkv = 8 at block 64)."""
    from deepkern.triton_kernels import sparse_attention as kernels

    for name in ("MAX_ROWS_FWD", "MAX_ROWS_DQ", "MAX_ROWS_DKDV"):
        monkeypatch.setattr(kernels, name, 32)
    q, k, v = sparse_inputs(1, 150, 4, 1, 64, torch.float16, device, grad=True)
    out, idx = deepkern.sparse_attention(q, k, v, 32, 1, 1, 1, causal, return_indices=True,
                                         backend="triton")
    _check_fwd_bwd(q, k, v, out, idx.cpu(), 32, causal, 1 / 8, torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_tma_and_pointer_loads_agree(device, causal, monkeypatch):
    """K/V tiles through tensor maps over the [B*S, Hkv*D] views (forward and dq kernels) and
    q/dO tiles through maps over the [B, S, Hq*D] views (dk/dv kernel; the GPU takes both for
    contiguous tensors) give the same bits as pointer loads: two batches, so the 2-D views run
    across the batch boundary, and a partial last block (rows past S zero-filled)."""
    from deepkern.triton_kernels import sparse_attention as kernels

    q, k, v = sparse_inputs(2, 200, 4, 2, 64, torch.float16, device, grad=True)
    if device == "cuda" and torch.cuda.get_device_capability()[0] >= 9:
        assert kernels._kv_descriptors(k, v, 32)[0] is not None, "contiguous k, v must take TMA"
    results = []
    for tma in (True, False):
        monkeypatch.setattr(kernels, "_tma_views_ok", lambda t, tma=tma: tma)
        out, idx = deepkern.sparse_attention(q, k, v, 32, 2, 1, 1, causal, return_indices=True,
                                             backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True)
        results.append((out, idx, *grads))
    for name, a, b in zip(("out", "idx", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), name
    _check_fwd_bwd(q, k, v, results[0][0], results[0][1].cpu(), 32, causal, 1 / 8, torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("L, slots", [(1, 1000), (3, 1000), (3, 7), (50, 2)])
def test_dkdv_work_covers_every_entry_once(device, L, slots):
    """The dk/dv work list (built on the device from the CSR offsets, with bounds in place
    of counts) covers each list's entries exactly once: whole, or as parts of <= L entries
    with distinct partial-sum slots that the split rows add up in order. More segments than
    the planning kernel's chunk, so its running totals carry across chunks."""
    from deepkern.triton_kernels import sparse_attention as kernels

    torch.manual_seed(0)
    bh, nb = 3, 700
    lens = torch.randint(0, 12, (bh * nb,))
    lens[::nb] = 40  # long lists at key block 0, launched first
    lens[5 * bh + 1] = 13  # and one later
    offs = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    work, split = kernels._dkdv_work(offs.to(device), bh, nb, L, slots)
    work, split = work.cpu(), split.cpu()
    assert work.shape[0] >= int(torch.clamp((lens + L - 1) // L, min=1).sum().clamp(max=bh * nb + slots))
    covered = {}
    used = []
    for seg, lo, hi, slot in work.tolist():
        if seg < 0:
            continue
        covered.setdefault(seg, []).append((lo, hi, slot))
        if slot >= 0:
            assert hi - lo <= L
            used.append(slot)
    assert len(used) == len(set(used)) and all(0 <= u < slots for u in used)
    for seg in range(bh * nb):
        items = sorted(covered[seg])
        assert items[0][0] == offs[seg] and items[-1][1] == offs[seg + 1], seg
        assert all(a[1] == b[0] for a, b in zip(items, items[1:])), seg
    sums = {seg: (base, n) for seg, base, n in split.tolist() if seg >= 0}
    for seg, items in covered.items():
        if len(items) > 1:
            base, n = sums.pop(seg)
            assert [slot for _, _, slot in sorted(items)] == list(range(base, base + n))
        else:
            assert items[0][2] == -1
    assert not sums


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length, slots", [(2, 512), (3, 4)])
def test_dkdv_split_lists(device, causal, length, slots, monkeypatch):
    """dk/dv lists longer than `length` entries run as parts whose fp32 partial sums a second
    kernel adds; with 4 slots only the first long lists in launch order split, the rest run
    whole. Two batches, GQA, a partial last block; the same bits on a second run."""
    from deepkern.triton_kernels import sparse_attention as kernels

    monkeypatch.setattr(kernels, "_split_length", lambda total, W, sms: length)
    monkeypatch.setattr(kernels, "SPLIT_SLOTS", slots)
    q, k, v = sparse_inputs(2, 300, 4, 2, 64, torch.float16, device, grad=True)
    out, idx = deepkern.sparse_attention(q, k, v, 32, 2, 1, 1, causal, return_indices=True,
                                         backend="triton")
    nb = nblocks(300, 32)
    offs, _ = kernels.transpose_indices(idx.contiguous(), nb)
    lens = offs[1:] - offs[:-1]
    assert (lens > length).sum() > 2, "the case must hold lists to split"
    work, split = kernels._dkdv_work(offs, 4, nb, length, slots)
    assert (split[:, 0] >= 0).sum() > 0 and (work[:, 3] >= 0).sum() <= slots
    if slots == 4:
        assert ((lens > length).sum() > (split[:, 0] >= 0).sum()), "some long lists run whole"
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert torch.equal(a, b), name
    _check_fwd_bwd(q, k, v, out, idx.cpu(), 32, causal, 1 / 8, torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_equivalent_matches_sdpa(device, causal):
    """Everything fits: every block kept, so the result is dense attention."""
    B, S, Hq, Hkv = 1, 100, 4, 2
    q, k, v = sparse_inputs(B, S, Hq, Hkv, 64, torch.float16, device, grad=True)
    out = deepkern.sparse_attention(q, k, v, 32, topk=4, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().cpu().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, enable_gqa=True)
    ref.backward(dout.double().cpu().transpose(1, 2))
    assert_close(out, ref.transpose(1, 2), torch.float16, what="out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, (qd, kd, vd)):
        assert_close(g, r.grad.transpose(1, 2), torch.float16, scale=2.0, what=name)


def _user_indices(B, Hkv, nb, W, device):
    """Random rows: any order, -1 anywhere, no repeats; block 1's row empty."""
    idx = torch.stack([torch.randperm(nb)[:W] for _ in range(B * Hkv * nb)]).view(B, Hkv, nb, W)
    idx = torch.where(torch.rand(idx.shape) < 0.3, -1, idx).to(torch.int32)
    idx[:, :, 1] = -1
    return idx.to(device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_user_indices(device, causal):
    B, S, Hq, Hkv, bs = 2, 180, 4, 2, 32
    q, k, v = sparse_inputs(B, S, Hq, Hkv, 64, torch.float16, device, grad=True)
    idx = _user_indices(B, Hkv, nblocks(S, bs), 4, device)
    out, used = deepkern.sparse_attention(q, k, v, bs, indices=idx, causal=causal,
                                          return_indices=True, backend="triton")
    assert used is idx
    assert (out[:, 32:64] == 0).all(), "a query block without keys must give 0"
    _check_fwd_bwd(q, k, v, out, idx.cpu(), bs, causal, 1 / 8, torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_strided_inputs_and_expanded_grad(device):
    """q, k, v as views of one packed qkv projection (unit last stride, other strides free);
    out.sum() hands the backward a stride-0 gradient."""
    B, S, Hq, Hkv, D = 1, 120, 2, 1, 64
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D).half().to(device).requires_grad_(True)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    out, idx = deepkern.sparse_attention(q, k, v, 32, topk=1, return_indices=True, backend="triton")
    out.float().sum().backward()
    ref_qkv = qkv.detach().double().requires_grad_(True)
    rq, rk, rv = ref_qkv[:, :, :Hq], ref_qkv[:, :, Hq:Hq + Hkv], ref_qkv[:, :, Hq + Hkv:]
    ref = sparse_attention_ref(rq, rk, rv, idx, 32, True)
    ref.sum().backward()
    assert_close(out, ref, torch.float16)
    assert_close(qkv.grad, ref_qkv.grad, torch.float16, scale=2.0, what="dqkv")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_nan_propagates_like_reference(device):
    q, k, v = sparse_inputs(1, 160, 2, 1, 64, torch.float16, device)
    k[0, 70, 0, 5] = float("nan")  # key block 2
    out, idx = deepkern.sparse_attention(q, k, v, 32, topk=1, return_indices=True, backend="triton")
    ref = sparse_attention_ref(q.double(), k.double(), v.double(), idx, 32, True)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref).cpu())
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    finite = ~torch.isnan(ref)
    assert_close(out[finite], ref[finite], torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_inputs(device):
    for backend in ("torch", "triton"):
        for B, S in ((0, 64), (2, 0)):
            q, k, v = sparse_inputs(B, S, 2, 1, 64, torch.float16, device)
            out, idx = deepkern.sparse_attention(q, k, v, return_indices=True, backend=backend)
            assert out.shape == q.shape and idx.shape == (B, 1, nblocks(S, 64), 19)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    q, k, v = sparse_inputs(1, 100, 4, 2, 64, torch.float16, device)
    args = (q, k, 32, 1, 1, 1, True, 0.125)
    torch.library.opcheck(torch.ops.deepkern_triton.select_blocks.default, args)
    idx = torch.ops.deepkern_triton.select_blocks(*args)
    for t in (q, k, v):
        t.requires_grad_(True)
    fwd_args = (q, k, v, idx, 32, True, 0.125)
    torch.library.opcheck(torch.ops.deepkern_triton.sparse_attention_fwd.default, fwd_args)
    out, lse = torch.ops.deepkern_triton.sparse_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, idx,
                32, True, 0.125)
    torch.library.opcheck(torch.ops.deepkern_triton.sparse_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    attn = deepkern.nn.BlockSparseAttention(32, topk=1, backend="triton")

    def fn(q, k, v, user_idx):
        a = attn(q, k, v)
        b = deepkern.sparse_attention(q, k, v, 32, indices=user_idx, backend="triton")
        return (a.float() * 2 + b.float()).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    q, k, v = sparse_inputs(1, 96, 2, 1, 64, torch.float16, device, grad=True)
    user_idx = torch.tensor([[[[0, -1], [0, 1], [2, 0]]]], dtype=torch.int32, device=device)
    out = compiled(q, k, v, user_idx)
    grads = torch.autograd.grad(out, (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = fn(q2, k2, v2, user_idx)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2))
    assert_close(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float16)


# ------------------------------------------------------------------------------------------
# Module, backends, bad input


def test_module():
    attn = deepkern.nn.BlockSparseAttention(32, topk=1, sink_blocks=1, local_blocks=1, causal=False)
    assert "topk=1" in repr(attn) and not list(attn.parameters())
    q, k, v = sparse_inputs(1, 100, 2, 1, 16, torch.float32, "cpu", grad=True)
    out, idx = attn(q, k, v, return_indices=True)
    assert idx.shape == (1, 1, 4, 3)
    assert_close(out, deepkern.sparse_attention(q, k, v, 32, 1, 1, 1, False, backend="torch"),
                 torch.float32)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    with pytest.raises(ValueError, match="block_size must be one of"):
        deepkern.nn.BlockSparseAttention(48)
    with pytest.raises(ValueError, match="local_blocks must be an int >= 1"):
        deepkern.nn.BlockSparseAttention(64, local_blocks=0)


def test_torch_backend_float32_any_head_dim():
    q, k, v = sparse_inputs(2, 90, 6, 3, 48, torch.float32, "cpu")
    out = deepkern.sparse_attention(q, k, v, 32, topk=3, backend="torch")
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    assert_close(out, sdpa, torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_backend_refusals(device):
    q, k, v = sparse_inputs(1, 64, 2, 1, 64, torch.float16, device)
    with pytest.raises(deepkern.BackendUnavailableError,
                       match=r"backend 'cuda' cannot serve this call: .*not implemented yet \(issue 5's part 2\)"):
        deepkern.sparse_attention(q, k, v, backend="cuda")
    with pytest.raises(deepkern.BackendUnavailableError, match="not implemented yet"):
        deepkern.select_blocks(q, k, backend="cuda")
    with pytest.raises(deepkern.BackendUnavailableError, match="dtype torch.float32"):
        deepkern.sparse_attention(q.float(), k.float(), v.float(), backend="triton")
    q96, k96, v96 = sparse_inputs(1, 64, 2, 1, 96, torch.float16, device)
    with pytest.raises(deepkern.BackendUnavailableError, match="head_dim 96"):
        deepkern.sparse_attention(q96, k96, v96, backend="triton")
    with pytest.raises(deepkern.BackendUnavailableError, match="topk=65 > 64"):
        deepkern.select_blocks(q, k, topk=65, backend="triton")
    # With given indices no selection runs, so topk does not matter.
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device)
    deepkern.sparse_attention(q, k, v, topk=65, indices=idx, backend="triton")


def test_auto_on_cpu_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.delenv("DEEPKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = sparse_inputs(1, 70, 2, 1, 64, torch.float16, "cpu")
    out = deepkern.sparse_attention(q, k, v, 32, topk=1)
    assert_close(out, deepkern.sparse_attention(q, k, v, 32, topk=1, backend="torch"), torch.float16)
    assert "sparse_attention" in deepkern._backend.availability(torch.device("cpu"))


def _base():
    return sparse_inputs(1, 64, 4, 2, 64, torch.float16, "cpu")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(q=torch.randn(64, 4, 64)), ValueError, r"q must be 4-D \[batch, seq, heads, head_dim\], got shape \(64, 4, 64\)"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor, got list"),
        (dict(k=torch.randn(1, 63, 2, 64).half()), ValueError, r"k.shape \(1, 63, 2, 64\) must be \[batch=1, seq=64, kv_heads, head_dim=64\]"),
        (dict(k=torch.randn(1, 64, 2, 32).half()), ValueError, r"k.shape \(1, 64, 2, 32\) must be"),
        (dict(v=torch.randn(1, 64, 1, 64).half()), ValueError, r"v.shape \(1, 64, 1, 64\) must equal k.shape \(1, 64, 2, 64\)"),
        (dict(k=torch.randn(1, 64, 3, 64).half(), v=torch.randn(1, 64, 3, 64).half()), ValueError, r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
        (dict(q=torch.randn(1, 64, 4, 64, dtype=torch.float64)), TypeError, "q.dtype must be float16, bfloat16 or float32, got torch.float64"),
        (dict(k=torch.randn(1, 64, 2, 64)), TypeError, r"k.dtype \(torch.float32\) must equal q.dtype \(torch.float16\)"),
        (dict(v=torch.ones(1, 64, 2, 64, dtype=torch.int32)), TypeError, "v.dtype must be float16, bfloat16 or float32, got torch.int32"),
        (dict(block_size=48), ValueError, r"block_size must be one of \(32, 64, 128\), got 48"),
        (dict(topk=-1), ValueError, "topk must be >= 0, got -1"),
        (dict(topk=2.5), TypeError, "topk must be an int, got float 2.5"),
        (dict(sink_blocks=-2), ValueError, "sink_blocks must be >= 0, got -2"),
        (dict(local_blocks=0), ValueError, "local_blocks must be >= 1, got 0"),
        (dict(causal=1), TypeError, "causal must be a bool, got int"),
        (dict(softmax_scale=-0.1), ValueError, "softmax_scale must be None or a finite number > 0, got -0.1"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be None or a finite number > 0, got nan"),
        (dict(indices=torch.zeros(1, 2, 1, 3, dtype=torch.int64)), TypeError, "indices.dtype must be torch.int32, got torch.int64"),
        (dict(indices=torch.zeros(1, 2, 2, 3, dtype=torch.int32)), ValueError, r"indices.shape must be \[batch=1, kv_heads=2, blocks=1, width>=1\] .* got \(1, 2, 2, 3\)"),
        (dict(indices=torch.zeros(1, 2, 1, 0, dtype=torch.int32)), ValueError, r"indices.shape must be .* got \(1, 2, 1, 0\)"),
        (dict(indices=torch.tensor([[[[0, 1]], [[0, -1]]]], dtype=torch.int32)), ValueError, r"indices values must be block ids in \[0, 1\) or -1 \(none\), got values in \[-1, 1\]"),
        (dict(indices=torch.tensor([[[[0, -2]], [[0, -1]]]], dtype=torch.int32)), ValueError, r"got values in \[-2, 0\]"),
        (dict(indices=torch.tensor([[[[0, 0]], [[0, -1]]]], dtype=torch.int32)), ValueError, "indices rows must not repeat a block id"),
        (dict(return_indices="yes"), TypeError, "return_indices must be a bool, got str"),
        (dict(backend="flash"), ValueError, "backend='flash'"),
    ],
)
def test_bad_input(change, exc, match):
    q, k, v = _base()
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        deepkern.sparse_attention(**kwargs)


def test_bad_input_select_blocks():
    q, k, _ = _base()
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        deepkern.select_blocks(q, torch.randn(1, 64, 3, 64).half())
    with pytest.raises(ValueError, match="topk must be >= 0, got -3"):
        deepkern.select_blocks(q, k, topk=-3)


@pytest.mark.cuda
def test_device_mismatch():
    q, k, v = sparse_inputs(1, 64, 2, 1, 64, torch.float16, "cuda")
    with pytest.raises(ValueError, match="k is on cpu, q on cuda:0"):
        deepkern.sparse_attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match="v is on cpu, q on cuda:0"):
        deepkern.sparse_attention(q, k, v.cpu())
    with pytest.raises(ValueError, match="indices is on cpu, q on cuda:0"):
        deepkern.sparse_attention(q, k, v, indices=torch.zeros(1, 1, 1, 1, dtype=torch.int32))


# ------------------------------------------------------------------------------------------
# GPU: the grid, bf16 / fp16, determinism, S = 1M selection memory


GRID_S = [1, 63, 64, 1000, 4096]
GRID_HEADS = [(8, 8), (8, 2), (8, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", GRID_HEADS, ids=lambda h: f"{h[0]}/{h[1]}")
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("S", GRID_S)
def test_grid_gpu(S, B, heads, D, causal):
    Hq, Hkv = heads
    dtype = torch.bfloat16
    bs, topk, sink, local = 64, 3, 1, 2  # sparse from S = 7 blocks on
    scale = 1 / math.sqrt(D)
    q, k, v = sparse_inputs(B, S, Hq, Hkv, D, dtype, "cuda", grad=True)
    out, idx = deepkern.sparse_attention(q, k, v, bs, topk, sink, local, causal,
                                         return_indices=True, backend="triton")
    check_selection(idx, q, k, bs, topk, sink, local, causal, scale)
    _check_fwd_bwd(q, k, v, out, idx, bs, causal, scale, dtype, ref_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs", [32, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sizes_gpu(dtype, bs, causal):
    B, S, Hq, Hkv, D = 2, 1500, 8, 2, 128
    q, k, v = sparse_inputs(B, S, Hq, Hkv, D, dtype, "cuda", grad=True)
    out, idx = deepkern.sparse_attention(q, k, v, bs, 5, 2, 2, causal, return_indices=True,
                                         backend="triton")
    check_selection(idx, q, k, bs, 5, 2, 2, causal, 1 / math.sqrt(D))
    _check_fwd_bwd(q, k, v, out, idx, bs, causal, 1 / math.sqrt(D), dtype, ref_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_dense_equivalent_gpu(causal):
    B, S, Hq, Hkv, D = 2, 1000, 8, 2, 128
    q, k, v = sparse_inputs(B, S, Hq, Hkv, D, torch.bfloat16, "cuda", grad=True)
    out = deepkern.sparse_attention(q, k, v, 64, topk=16, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, enable_gqa=True)
    ref.backward(dout.float().transpose(1, 2))
    assert_close(out, ref.transpose(1, 2), torch.bfloat16, what="out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, (qf, kf, vf)):
        assert_close(g, r.grad.transpose(1, 2), torch.bfloat16, scale=2.0, what=name)


@pytest.mark.cuda
def test_user_indices_gpu():
    B, S, Hq, Hkv, D, bs = 2, 2000, 8, 2, 128, 64
    q, k, v = sparse_inputs(B, S, Hq, Hkv, D, torch.bfloat16, "cuda", grad=True)
    idx = _user_indices(B, Hkv, nblocks(S, bs), 12, "cuda")
    for causal in (True, False):
        out = deepkern.sparse_attention(q, k, v, bs, indices=idx, causal=causal, backend="triton")
        _check_fwd_bwd(q, k, v, out, idx, bs, causal, 1 / math.sqrt(D), torch.bfloat16,
                       ref_dtype=torch.float32)


@pytest.mark.cuda
def test_backward_deterministic_gpu():
    """Block 0 (a sink) is in every row: its dk/dv sums ~nb contributions; two runs must give
    the same bits for dq, dk and dv."""
    q, k, v = sparse_inputs(1, 8192, 8, 2, 128, torch.bfloat16, "cuda", grad=True)
    out = deepkern.sparse_attention(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs run to run"


@pytest.mark.cuda
def test_compile_and_cuda_graph_gpu():
    q, k, v = sparse_inputs(1, 4096, 8, 2, 128, torch.bfloat16, "cuda")
    eager = deepkern.sparse_attention(q, k, v, backend="triton")
    graph = torch.cuda.CUDAGraph()
    deepkern.sparse_attention(q, k, v, backend="triton")
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = deepkern.sparse_attention(q, k, v, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
