"""deepkern.layernorm_gelu: kernels (CUDA, Triton) against the fp64 reference, gradients,
modules, compile/graph capture and bad input.

On a CPU-only machine the Triton kernels run in the interpreter (small shapes); the `cuda`
tests run both kernel backends on the GPU at the issue's shapes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICES
from helpers import REL_TOL, assert_close, rel_error

import deepkern
from deepkern.reference import layernorm_gelu_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _backends(device):
    return ["triton"] if device == "cpu" else ["cuda", "triton"]


def _inputs(shape, dtype, device, weight=True, bias=True, param_dtype=None, residual=False):
    n = shape[-1]
    pd = param_dtype or dtype
    # Off-centre, non-unit scale so the mean/variance paths matter.
    x = (torch.randn(shape, dtype=torch.float32) * 2.0 + 0.5).to(dtype).to(device)
    w = (torch.rand(n) + 0.5).to(pd).to(device) if weight else None
    b = (torch.randn(n) * 0.5).to(pd).to(device) if bias else None
    r = torch.randn(shape, dtype=torch.float32).to(dtype).to(device) if residual else None
    return x, w, b, r


def _ref(x, w, b, r, eps, approximate, norm):
    """fp64 reference on the same inputs; h rounded to x's dtype as the kernels store it."""
    h = x if r is None else x + r
    y = layernorm_gelu_ref(
        h.double(), None if w is None else w.double(), None if b is None else b.double(),
        eps, approximate, None, norm,
    )
    return y, h


def _check_forward(shape, dtype, device, backend, approximate="none", norm="layernorm",
                   weight=True, bias=True, param_dtype=None, residual=False, eps=1e-5):
    x, w, b, r = _inputs(shape, dtype, device, weight, bias, param_dtype, residual)
    out = deepkern.layernorm_gelu(x, w, b, eps, approximate, r, norm, backend=backend)
    y_ref, h_ref = _ref(x, w, b, r, eps, approximate, norm)
    if residual:
        y, h = out
        assert h.dtype == dtype and h.shape == x.shape
        assert_close(h, h_ref, dtype, what="h")
    else:
        y = out
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, what=f"y [{backend} {tuple(shape)} {norm} residual={residual}]")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 1024])
def test_forward_small(device, dtype, n):
    for backend in _backends(device):
        _check_forward((5, n), dtype, device, backend)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    "variant",
    [
        dict(approximate="tanh"),
        dict(norm="rmsnorm"),
        dict(residual=True),
        dict(residual=True, norm="rmsnorm", approximate="tanh"),
        dict(weight=False, bias=False),
        dict(bias=False),
        dict(param_dtype=torch.float32),
        dict(eps=1e-2),
    ],
    ids=lambda v: ",".join(f"{k}={getattr(x, '__name__', x)}" for k, x in v.items()),
)
def test_forward_variants(device, variant):
    for backend in _backends(device):
        for dtype in (torch.float16, torch.bfloat16):
            _check_forward((3, 4, 520), dtype, device, backend, **variant)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("n", [2500, 3000, 6144])
def test_forward_register_chunks(device, n):
    """Widths a power-of-two block would pad (Triton: the row as 3-5 chunks in registers)."""
    for backend in _backends(device):
        _check_forward((3, n), torch.bfloat16, device, backend)
        _check_forward((2, n), torch.float32, device, backend, norm="rmsnorm", residual=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("n", [20000, 40000, 65536])
def test_forward_long_rows(device, n):
    """Rows past the fp32-register limit: 16-bit rows held in 16 bits (Triton: LOW chunks),
    fp32 rows looped over twice."""
    for backend in _backends(device):
        _check_forward((3, n), torch.bfloat16, device, backend)
        _check_forward((2, n), torch.float16, device, backend, residual=True)
        _check_forward((2, n), torch.bfloat16, device, backend, norm="rmsnorm", residual=True)
        _check_forward((2, n), torch.float32, device, backend, norm="rmsnorm", residual=True)


@pytest.mark.cuda
@pytest.mark.parametrize("env", [{"DEEPKERN_LNG_FWD_CLUSTER": "1"}, {"DEEPKERN_LNG_FWD_CLUSTER": "2"},
                                 {"DEEPKERN_LNG_FWD_PAIR": "0"}], ids=["cluster1", "cluster2", "nopair"])
def test_forward_long_rows_cuda_paths(monkeypatch, env):
    """The CUDA split forward without thread clusters (one CTA per row), with small ones (rows
    too long for two CTAs fall back to one CTA or the looped kernel), and with one row per CTA
    where the default takes two (a residual)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for n in (20000, 40000, 65536):
        _check_forward((3, n), torch.bfloat16, "cuda", "cuda")
        _check_forward((2, n), torch.float16, "cuda", "cuda", residual=True, norm="rmsnorm")
        _check_forward((2, n), torch.float32, "cuda", "cuda", residual=True)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [16384 + 8, 20000, 32768, 40000, 65536, 131072])
def test_forward_row_pairs_cuda(monkeypatch, n):
    """The two-row split forward (the default with a residual, forced here for all cases; rows
    over >= 2 CTAs; 131072 keeps one row per CTA): odd and even row counts (the last pair half
    empty), uneven parts (40000), fp32 parameters, no weight/bias, a residual with rmsnorm,
    tanh, fp32 rows; saved mean/rstd through the backward."""
    monkeypatch.setenv("DEEPKERN_LNG_FWD_PAIR", "1")
    _check_forward((301, n), torch.bfloat16, "cuda", "cuda")
    _check_forward((64, n), torch.float16, "cuda", "cuda", param_dtype=torch.float32, approximate="tanh")
    _check_forward((33, n), torch.bfloat16, "cuda", "cuda", weight=False, bias=False)
    _check_forward((17, n), torch.bfloat16, "cuda", "cuda", residual=True, norm="rmsnorm")
    _check_forward((9, n), torch.float32, "cuda", "cuda", residual=True, bias=False)
    _check_backward((21, n), torch.bfloat16, "cuda", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("n", [2040, 2048, 3000, 5120, 6144, 7168, 10240])
def test_forward_split_widths_cuda(n):
    """The CUDA split forward's thread layouts: 255 vectors (rows kernel) and 256 (split), 8
    vectors per thread with a partly idle last warp (3000), 5/6/7 per thread filling whole
    warps (5120, 6144, 7168), 5 warps of 8 (10240); with and without weight and bias (two
    copies of the normalize phase), fp32 weights, a residual."""
    _check_forward((33, n), torch.bfloat16, "cuda", "cuda")
    _check_forward((17, n), torch.float16, "cuda", "cuda", weight=False, bias=False)
    _check_forward((17, n), torch.bfloat16, "cuda", "cuda", bias=False, param_dtype=torch.float32)
    _check_forward((9, n), torch.float32, "cuda", "cuda", residual=True, norm="rmsnorm")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2048, 1), (1025, 1000), (512, 5120), (13, 12288), (64, 65536),
                                   (4, 8, 4096), (300, 65537), (333, 70), (333, 640)])
def test_forward_gpu_shapes(dtype, shape):
    for backend in ("cuda", "triton"):
        _check_forward(shape, dtype, "cuda", backend)
        _check_forward(shape, dtype, "cuda", backend, residual=True, norm="rmsnorm")


def _check_backward(shape, dtype, device, backend, approximate="none", norm="layernorm",
                    weight=True, bias=True, param_dtype=None, residual=False):
    x, w, b, r = _inputs(shape, dtype, device, weight, bias, param_dtype, residual)
    leaves = [t for t in (x, w, b, r) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float32).to(dtype).to(device)
    out = deepkern.layernorm_gelu(x, w, b, 1e-5, approximate, r, norm, backend=backend)
    if residual:
        y, h = out
        dh = torch.randn(shape, dtype=torch.float32).to(dtype).to(device)
        torch.autograd.backward([y, h], [dy, dh])
    else:
        out.backward(dy)
    grads = [t.grad for t in leaves]

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    rx = ref_leaves[0]
    it = iter(ref_leaves[1:])
    rw = next(it) if w is not None else None
    rb = next(it) if b is not None else None
    rr = next(it) if r is not None else None
    # Reference h in fp64 (no rounding): the kernels round h to x's dtype before normalizing;
    # that rounding sits well inside the per-dtype bound.
    ref = layernorm_gelu_ref(rx, rw, rb, 1e-5, approximate, rr, norm)
    if residual:
        torch.autograd.backward(list(ref), [dy.double(), dh.double()])
    else:
        ref.backward(dy.double())
    # PyTorch's own error at the input precision (the reference run on the low-precision
    # inputs, fp32 math): some gradients are ill-conditioned (e.g. hidden=1 rmsnorm, where dx
    # is a difference of nearly equal terms), and no fp32 kernel can beat that. The bound is
    # the per-dtype one or 4x PyTorch's own error, whichever is larger.
    lp_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    it = iter(lp_leaves[1:])
    lw = next(it) if w is not None else None
    lb = next(it) if b is not None else None
    lr = next(it) if r is not None else None
    lp = layernorm_gelu_ref(lp_leaves[0], lw, lb, 1e-5, approximate, lr, norm)
    if residual:
        torch.autograd.backward(list(lp), [dy, dh])
    else:
        lp.backward(dy)
    names = ["dx", "dweight", "dbias", "dresidual"]
    present = [n for n, t in zip(names, (x, w, b, r)) if t is not None]
    for name, g, rl, ll, t in zip(present, grads, ref_leaves, lp_leaves, leaves):
        assert g is not None, f"{name} is missing"
        assert g.dtype == t.dtype and g.shape == t.shape
        torch_err = rel_error(ll.grad, rl.grad)
        scale = max(2.0, 4 * torch_err / REL_TOL[dtype])
        assert_close(g, rl.grad, dtype, scale=scale,
                     what=f"{name} [{backend} {tuple(shape)} {norm} residual={residual}]")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 1000])
def test_backward_small(device, dtype, n):
    for backend in _backends(device):
        _check_backward((9, n), dtype, device, backend)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    "variant",
    [
        dict(approximate="tanh"),
        dict(norm="rmsnorm"),
        dict(residual=True),
        dict(weight=False, bias=False),
        dict(bias=False, norm="rmsnorm"),
        dict(param_dtype=torch.float32),
    ],
    ids=lambda v: ",".join(f"{k}={getattr(x, '__name__', x)}" for k, x in v.items()),
)
def test_backward_variants(device, variant):
    for backend in _backends(device):
        _check_backward((2, 3, 264), torch.float16, device, backend, **variant)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_backward_long_rows(device):
    for backend in _backends(device):
        _check_backward((5, 20000), torch.float32, device, backend)
        _check_backward((3, 40000), torch.bfloat16, device, backend, residual=True)


@pytest.mark.parametrize(
    "n, blocks",
    [(1, (1, 0)), (3, (2, 1)), (24, (16, 8)), (40, (32, 8)), (96, (64, 32)), (1000, (1024, 0)),
     (1024, (1024, 0)), (1536, (1024, 512)), (3072, (2048, 1024)), (5120, (4096, 1024)),
     (12288, (8192, 4096)), (16000, (16384, 0))],
)
def test_backward_row_blocks(n, blocks):
    """The Triton backward's row chunks (BLOCK_A, BLOCK_B): the largest power of two <= n plus
    a power of two for the rest, or one padded block when the rest needs a block of BLOCK_A."""
    from deepkern.triton_kernels import layernorm_gelu as tk

    assert tk._bwd_row_blocks(n) == blocks
    assert tk._bwd_row_blocks(n, two_chunks=False) == (1 << (n - 1).bit_length(), 0)


def _check_triton_bwd(x, w, b, dy, norm, approximate, config):
    """The Triton backward launcher called directly (mean/rstd from the Triton forward) against
    the fp64 reference, with _check_backward's bounds. Its outputs come from torch.empty, which
    the autouse fixture fills with NaN: an element the kernel does not write fails."""
    from deepkern.triton_kernels import layernorm_gelu as tk

    rms, tanh = norm == "rmsnorm", approximate == "tanh"
    _, _, mean, rstd = tk.layernorm_gelu_fwd(x, w, b, None, 1e-5, rms, tanh)
    dx, dw, db = tk.layernorm_gelu_bwd(dy, x, w, b, mean, rstd, rms, tanh, config)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = {}
    for prec in (torch.float64, None):  # the fp64 reference, then PyTorch at the input precision
        ref = [t.detach().to(prec or t.dtype).requires_grad_(True) for t in leaves]
        it = iter(ref[1:])
        rw = next(it) if w is not None else None
        rb = next(it) if b is not None else None
        out = layernorm_gelu_ref(ref[0], rw, rb, 1e-5, approximate, None, norm)
        out.backward(dy.to(out.dtype))
        grads[prec] = [t.grad for t in ref]
    names = ["dx"] + (["dweight"] if w is not None else []) + (["dbias"] if b is not None else [])
    outs = [dx] + ([dw] if w is not None else []) + ([db] if b is not None else [])
    what = (f"[{tuple(x.shape)} {x.dtype} {norm} {approximate} w={w is not None} "
            f"b={b is not None} {config}]")
    for name, g, r64, rlp, t in zip(names, outs, grads[torch.float64], grads[None], leaves):
        assert g.dtype == t.dtype and g.shape == t.shape, f"{name} {what}"
        scale = max(2.0, 4 * rel_error(rlp, r64) / REL_TOL[t.dtype])
        assert_close(g, r64, t.dtype, scale=scale, what=f"{name} {what}")
    if w is None:
        assert dw.numel() == 0
    if b is None:
        assert db.numel() == 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [24, 40, 96, 1000, 1536, 5120, 12288])
def test_backward_two_chunks(device, dtype, n):
    """Widths the Triton backward holds as two power-of-two chunks (24 = 16 + 8, ..., 12288 =
    8192 + 4096; 1000: one padded block), layernorm and rmsnorm, with and without weight and
    bias; several rows per program (per_sm=1) with and without the prefetch, and with the row
    loop pipelined (stages=3); and the single padded block (two_chunks=False; 12288: the
    two-kernel path) against the same reference."""
    configs = [None, {"two_chunks": False}, {"per_sm": 1, "prefetch": True},
               {"per_sm": 1, "prefetch": False}, {"per_sm": 1, "stages": 3}]
    variants = [
        dict(norm="layernorm"),
        dict(norm="rmsnorm", bias=False),
        dict(norm="layernorm", weight=False, bias=False),
        dict(norm="rmsnorm", approximate="tanh"),
    ]
    for i, v in enumerate(variants):
        x, w, b, _ = _inputs((7, n), dtype, device, v.get("weight", True), v.get("bias", True))
        dy = torch.randn((7, n), dtype=torch.float32).to(dtype).to(device)
        for config in configs if i == 0 else configs[:2]:
            _check_triton_bwd(x, w, b, dy, v["norm"], v.get("approximate", "none"), config)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 1), (1025, 1000), (777, 5120), (300, 12288), (40, 65536),
                                   (3, 7, 2048), (50, 16383), (333, 70), (333, 640)])
def test_backward_gpu_shapes(dtype, shape):
    for backend in ("cuda", "triton"):
        _check_backward(shape, dtype, "cuda", backend)
        _check_backward(shape, dtype, "cuda", backend, residual=True, norm="rmsnorm",
                        param_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("env", [{"DEEPKERN_LNG_BWD_RING_ITERS": "1"},
                                 {"DEEPKERN_LNG_BWD_RING_CLUSTER": "2"},
                                 {"DEEPKERN_LNG_BWD_RING_CLUSTER": "3"},
                                 {"DEEPKERN_LNG_BWD_RING": "0"}])
def test_backward_cuda_paths(monkeypatch, env):
    """The CUDA backward's other configurations: one vector per thread, rows split over
    thread clusters of more CTAs, and the kernels without the copy ring."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for shape in [(2000, 1024), (777, 5120), (300, 12288), (40, 65536), (333, 640), (1025, 1000)]:
        _check_backward(shape, torch.bfloat16, "cuda", "cuda")
        _check_backward(shape, torch.float16, "cuda", "cuda", residual=True, norm="rmsnorm",
                        param_dtype=torch.float32)
    _check_backward((300, 12288), torch.float32, "cuda", "cuda")


@pytest.mark.cuda
def test_backward_auto_mixed_backends():
    """Training under "auto" runs Triton's forward with CUDA's backward at these widths; the
    gradients must still match the reference."""
    from deepkern.ops.layernorm_gelu import _auto_order

    assert _auto_order(5120, False)[0] == "triton" and _auto_order(5120, True)[0] == "cuda"
    assert _auto_order(1024, False, training=True)[0] == "cuda"  # one backend for short rows
    for shape in [(777, 5120), (300, 12288), (5, 3, 4096)]:
        _check_backward(shape, torch.bfloat16, "cuda", "auto")
        _check_backward(shape, torch.float16, "cuda", "auto", residual=True, norm="rmsnorm",
                        param_dtype=torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(6, 1100).to(device)
    sliced = base[:, 50:1050]  # row stride 1100, unit last stride: used in place
    transposed = torch.randn(1000, 6).to(device).t()  # no row view: copied
    w = torch.rand(1000).to(device) + 0.5
    b = torch.randn(1000).to(device)
    for x in (sliced, transposed, base[::2, :1000]):
        for backend in _backends(device):
            xg = x.clone().requires_grad_(True)
            y = deepkern.layernorm_gelu(x, w, b, backend=backend)
            assert_close(y, layernorm_gelu_ref(x.double(), w.double(), b.double()), torch.float32)
            y2 = deepkern.layernorm_gelu(xg, w, b, backend=backend)
            dy = torch.randn_like(y2).t().contiguous().t()  # a non-contiguous gradient
            y2.backward(dy)
            xr = x.detach().double().requires_grad_(True)
            layernorm_gelu_ref(xr, w.double(), b.double()).backward(dy.double())
            assert_close(xg.grad, xr.grad, torch.float32, scale=2.0, what="dx")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_expanded_gradient(device):
    """y.sum().backward() hands the kernel a stride-0 gradient."""
    x = torch.randn(4, 96).to(device).requires_grad_(True)
    for backend in _backends(device):
        x.grad = None
        deepkern.layernorm_gelu(x, backend=backend).sum().backward()
        xr = x.detach().double().requires_grad_(True)
        layernorm_gelu_ref(xr).sum().backward()
        assert_close(x.grad, xr.grad, torch.float32, scale=2.0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_elementwise_accuracy(device, dtype):
    """GELU and its derivative value by value over z in [-9, 9], tails included: with weight 0
    the kernels see z = bias exactly, so y = GELU(bias) and (one row, dy = 1) dbias =
    GELU'(bias). The reference uses erfc: 0.5 * (1 + erf(z / sqrt 2)) cancels to nothing in
    the tail even in fp64. Bound: 1 ulp of the output dtype (fp32: 2e-5 relative); the old
    0.5 * (1 + erff(z / sqrt 2)) form fails it for z < -4."""
    z = torch.linspace(-9.0, 9.0, 721, dtype=torch.float64)
    info = torch.finfo(dtype)
    rel = 2e-5 if dtype == torch.float32 else info.eps
    tiny = info.smallest_normal * info.eps  # subnormal spacing
    n = z.numel()
    x = torch.randn(1, n).to(dtype).to(device)
    w = torch.zeros(n, dtype=dtype, device=device, requires_grad=True)
    b = z.to(dtype).to(device).requires_grad_(True)
    zq = b.detach().double().cpu()  # z as the kernel sees it (rounded to dtype)
    phi = 0.5 * torch.special.erfc(-zq / 2**0.5)
    zpdf = zq * torch.exp(-0.5 * zq * zq) / (2 * torch.pi) ** 0.5
    # GELU'(z) = Phi(z) + z pdf(z) is a difference of near-equal terms around its root
    # (z = -0.75); the bound there scales with the terms, not the result.
    cases = (("y", zq * phi, (zq * phi).abs()), ("dbias", phi + zpdf, phi + zpdf.abs()))
    for backend in _backends(device):
        w.grad = b.grad = None
        y = deepkern.layernorm_gelu(x, w, b, backend=backend)
        y.backward(torch.ones_like(y))
        for (name, ref, scale), out in zip(cases, (y[0], b.grad)):
            err = (out.double().cpu() - ref).abs()
            bound = rel * scale + tiny
            worst = int(torch.argmax(err / bound))
            assert bool((err <= bound).all()), (
                f"{name} [{backend} {dtype}] at z={zq[worst].item():.4f}: {out[worst].item():.6e} "
                f"vs {ref[worst].item():.6e}"
            )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_nan_inf_propagate(device):
    x = torch.randn(4, 256).to(device)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    for backend in _backends(device):
        y = deepkern.layernorm_gelu(x, backend=backend)
        ref = layernorm_gelu_ref(x)
        assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
        assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
        assert_close(y[[0, 3]], ref[[0, 3]], torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_inputs(device):
    for backend in _backends(device) + ["torch"]:
        x = torch.randn(0, 64).to(device)
        y = deepkern.layernorm_gelu(x, torch.ones(64, device=device), backend=backend)
        assert y.shape == (0, 64)
        y, h = deepkern.layernorm_gelu(x, residual=torch.randn(0, 64).to(device), backend=backend)
        assert y.shape == h.shape == (0, 64)


def test_torch_backend_matches_eager():
    x = torch.randn(8, 300, dtype=torch.float64)
    w, b = torch.rand(300, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    eager = F.gelu(F.layer_norm(x, (300,), w, b, 1e-5))
    assert_close(deepkern.layernorm_gelu(x.float(), w.float(), b.float(), backend="torch"), eager,
                 torch.float32)
    eager_tanh = F.gelu(F.rms_norm(x, (300,), w, 1e-5) + b, approximate="tanh")
    out = deepkern.layernorm_gelu(x.float(), w.float(), b.float(), approximate="tanh",
                                  norm="rmsnorm", backend="torch")
    assert_close(out, eager_tanh, torch.float32)


# ------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs, determinism


def _op_args(device, dtype=torch.float16, residual=True):
    x, w, b, r = _inputs((6, 256), dtype, device, residual=residual)
    return x, w, b, r


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    ops = [torch.ops.deepkern_triton]
    if device == "cuda":
        ops.append(torch.ops.deepkern)
    for ns in ops:
        for residual in (True, False):
            x, w, b, r = _op_args(device, residual=residual)
            fwd_args = (x, w, b, r, 1e-5, False, False)
            x.requires_grad_(True)
            w.requires_grad_(True)
            torch.library.opcheck(ns.layernorm_gelu_fwd.default, fwd_args)
            y, h, mean, rstd = ns.layernorm_gelu_fwd(*fwd_args)
            dy = torch.randn_like(y)
            xin = h if residual else x
            torch.library.opcheck(
                ns.layernorm_gelu_bwd.default,
                (dy, xin.detach(), w.detach(), b, mean, rstd, False, False),
            )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    mod = deepkern.nn.LayerNormGELU(256).to(device)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_()
    backend = "triton" if device == "cpu" else None

    def fn(x, r):
        y, h = deepkern.layernorm_gelu(x, mod.weight, mod.bias, residual=r, backend=backend)
        return (y * 2 + h).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(8, 256, device=device, requires_grad=True)
    r = torch.randn(8, 256, device=device)
    out = compiled(x, r)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = fn(x2, r)
    ref.backward()
    assert_close(out, ref, torch.float32)
    assert_close(x.grad, x2.grad, torch.float32)


@pytest.mark.cuda
def test_cuda_graph_capture():
    for backend in ("cuda", "triton"):
        x, w, b, r = _inputs((1024, 4096), torch.bfloat16, "cuda", residual=True)
        deepkern.layernorm_gelu(x, w, b, residual=r, backend=backend)  # warm up (compile)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, h = deepkern.layernorm_gelu(x, w, b, residual=r, backend=backend)
        x.copy_(torch.randn_like(x))  # new data, same buffers
        graph.replay()
        torch.cuda.synchronize()
        y_ref, h_ref = _ref(x, w, b, r, 1e-5, "none", "layernorm")
        assert_close(y, y_ref, torch.bfloat16)
        assert_close(h, h_ref, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [4096, 65536])
def test_dweight_deterministic(n):
    for backend in ("cuda", "triton"):
        x, w, b, _ = _inputs((4096 if n == 4096 else 256, n), torch.bfloat16, "cuda",
                             param_dtype=torch.float32)
        dy = torch.randn_like(x)
        grads = []
        for _ in range(2):
            wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            deepkern.layernorm_gelu(x, wg, bg, backend=backend).backward(dy)
            grads.append((wg.grad, bg.grad))
        assert torch.equal(grads[0][0], grads[1][0]), f"{backend}: dweight differs run to run"
        assert torch.equal(grads[0][1], grads[1][1]), f"{backend}: dbias differs run to run"


# ------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_module_from_modules_and_fuse(norm):
    torch.manual_seed(1)
    nn_norm = (torch.nn.LayerNorm(64) if norm == "layernorm" else torch.nn.RMSNorm(64, eps=1e-6))
    with torch.no_grad():
        nn_norm.weight.uniform_(0.5, 1.5)
        if getattr(nn_norm, "bias", None) is not None:
            nn_norm.bias.normal_()
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), nn_norm, torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 8),
        torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU()),
    )
    x = torch.randn(5, 32)
    before = model(x)
    keys = set(model.state_dict())
    assert deepkern.nn.fuse_layernorm_gelu(model) == 2
    assert isinstance(model[1], deepkern.nn.LayerNormGELU) and isinstance(model[2], torch.nn.Identity)
    assert model[1].norm == norm and model[1].approximate == "tanh"
    assert set(model.state_dict()) == keys
    assert_close(model(x), before, torch.float32)
    assert deepkern.nn.fuse_layernorm_gelu(model) == 0


def test_module_defaults_and_grad():
    m = deepkern.nn.LayerNormGELU(48, bias=False)
    assert m.bias is None and torch.equal(m.weight, torch.ones(48))
    x = torch.randn(3, 48, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is not None and x.grad is not None
    assert "48" in repr(m)


# ------------------------------------------------------------------------------------------
# Bad input: clear errors before any launch


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(weight=torch.ones(63)), ValueError, r"weight.shape must be \(64,\)"),
        (dict(bias=torch.ones(2, 32)), ValueError, r"bias.shape must be \(64,\)"),
        (dict(weight=torch.ones(64, dtype=torch.float64)), TypeError, "weight.dtype"),
        (dict(residual=torch.ones(4, 63)), ValueError, "residual.shape"),
        (dict(residual=torch.ones(4, 64, dtype=torch.float16)), TypeError, "residual.dtype"),
        (dict(approximate="fast"), ValueError, "approximate='fast'"),
        (dict(norm="batchnorm"), ValueError, "norm='batchnorm'"),
        (dict(eps=0.0), ValueError, "eps must be"),
        (dict(eps=-1e-5), ValueError, "eps must be"),
        (dict(backend="cudnn"), ValueError, "backend='cudnn'"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        deepkern.layernorm_gelu(torch.randn(4, 64), **kwargs)


def test_weight_bias_dtypes_differ():
    x = torch.randn(4, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="share a dtype"):
        deepkern.layernorm_gelu(x, torch.ones(64), torch.ones(64, dtype=torch.float16))


def test_bad_x():
    with pytest.raises(TypeError, match="x.dtype"):
        deepkern.layernorm_gelu(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        deepkern.layernorm_gelu([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        deepkern.layernorm_gelu(torch.tensor(1.0))


@pytest.mark.cuda
def test_device_mismatch():
    with pytest.raises(ValueError, match="weight is on cpu"):
        deepkern.layernorm_gelu(torch.randn(4, 64, device="cuda"), torch.ones(64))
    with pytest.raises(ValueError, match="residual is on cpu"):
        deepkern.layernorm_gelu(torch.randn(4, 64, device="cuda"), residual=torch.ones(4, 64))


def test_explicit_backend_that_cannot_serve():
    x = torch.randn(4, 64)
    with pytest.raises(deepkern.BackendUnavailableError, match="'cuda' cannot serve"):
        deepkern.layernorm_gelu(x, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_gpu():
    """Tensors on a GPU that is not the current device: both backends launch there."""
    x, w, b, _ = _inputs((7, 1000), torch.bfloat16, "cuda:1")
    x.requires_grad_(True)
    for backend in ("cuda", "triton"):
        y = deepkern.layernorm_gelu(x, w, b, backend=backend)
        assert y.device == x.device
        assert_close(y, _ref(x.detach(), w, b, None, 1e-5, "none", "layernorm")[0], torch.bfloat16)
        (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
        assert dx.device == x.device and torch.isfinite(dx).all()
