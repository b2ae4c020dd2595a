"""deepkern.int4_matmul: Triton kernels (every path: GEMV, split-K and tiled tensor-core,
backward) against x @ w.dequantize().T in fp64, exact dequantization, gradients, opcheck,
torch.compile, CUDA graphs and bad input.

On a CPU-only machine the kernels run in the Triton interpreter on small shapes (fp16: the
interpreter's bf16 tl.dot is broken); the `cuda` tests cover the issue's shapes and bf16."""

import pytest
import torch
from conftest import KERNEL_DEVICES, needs_interpreter
from helpers import assert_close

import deepkern
from deepkern.quant import Int4Weight, quantize_int4
from deepkern.reference import int4_matmul_ref
from deepkern.triton_kernels import int4_matmul as kernels
from deepkern.triton_kernels.int4_matmul import Config, config_override

GEMV = Config("gemv", 1, 16, 64, 0)
DOT = Config("dot", 16, 32, 64, 0)
DOT_NOSPLIT = Config("dot", 16, 16, 32, 1)
GEMV_PREFETCH = Config("gemv", 1, 16, 32, 0, prefetch=True)  # several tiles per split
DOT_SWAP = Config("dot", 16, 32, 64, 0, swap=True)  # y^T = W x^T, scales prefetched per tile


def _weight(n, k, group_size=64, symmetric=False, device="cpu", dtype=torch.float16):
    w = (torch.randn(n, k) * 0.05 + 0.003).to(dtype)
    return quantize_int4(w, group_size, symmetric).to(device)


def _x(m, k, dtype, device, batch=()):
    return (torch.randn(*batch, m, k) + 0.1).to(dtype).to(device)


def _ref(x, w, bias=None):
    """fp64 reference on the dequantized weight (rounded once to x's dtype, as the kernels)."""
    wd = w.dequantize(x.dtype if x.dtype != torch.float32 else torch.float32).double()
    y = x.double() @ wd.T
    return y + bias.double() if bias is not None else y


def _check(m, n, k, group_size=64, symmetric=False, dtype=torch.float16, device="cpu",
           bias=False, config=None, backend="triton", batch=()):
    w = _weight(n, k, group_size, symmetric, device)
    x = _x(m, k, dtype, device, batch)
    b = (torch.randn(n) * 0.1).to(dtype).to(device) if bias else None
    if config is None:
        y = deepkern.int4_matmul(x, w, b, backend=backend)
    else:
        with config_override(config):
            y = deepkern.int4_matmul(x, w, b, backend=backend)
    assert y.dtype == dtype and y.shape == (*batch, m, n)
    assert_close(y, _ref(x, w, b), dtype, what=f"y M={m} N={n} K={k} g={group_size}")


# ------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("m", [1, 2, 13, 16, 17, 64, 300])
def test_forward_batch_sizes(device, m):
    _check(m, 40, 256, 64, device=device, bias=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_group_sizes(device, group_size, symmetric):
    for m in (1, 5):  # GEMV (M=1) and the tensor-core path
        _check(m, 24, 512, group_size, symmetric, device=device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("config", [GEMV, GEMV_PREFETCH, DOT, DOT_NOSPLIT, DOT_SWAP],
                         ids=["gemv", "gemv-prefetch", "dot", "dot-nosplit", "dot-swap"])
@pytest.mark.parametrize("n, k, group_size", [(13, 320, 64), (7, 100, -1), (33, 96, 32)])
def test_forward_odd_shapes_every_path(device, config, n, k, group_size):
    """K not a multiple of the K tile (320 = 5 x 64), K % 8 != 0 (channelwise 100), groups
    smaller than the K tile (g=32 < 64: per-word scales), ragged N, bias, a batch dim."""
    _check(3, n, k, group_size, device=device, config=config, bias=True, batch=(2,))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dequantization_is_exact(device):
    """Identity activations read the dense weight back: every kernel path builds exactly
    Int4Weight.dequantize(x.dtype) (GEMV, per-tile and per-word scales, the dx kernel)."""
    for group_size, k in ((32, 64), (64, 128), (-1, 36)):
        for symmetric in (False, True):
            w = _weight(24, k, group_size, symmetric, device=device)
            dense = w.dequantize(torch.float16)
            eye_k = torch.eye(k, dtype=torch.float16, device=device)
            some = torch.randperm(k)[:8]  # GEMV runs one program row per x row: a sample
            for config, rows in ((GEMV, some), (DOT, slice(None)), (Config("dot", 16, 16, 32, 1), slice(None)),
                                 (DOT_SWAP, slice(None))):
                y = kernels.int4_matmul_fwd(eye_k[rows], w.packed, w.scales, w.zeros, w.group_len, None, config)
                assert torch.equal(y, dense.T[rows]), f"{config} g={group_size}"
            eye_n = torch.eye(24, dtype=torch.float16, device=device)
            dx = kernels.int4_matmul_dx(eye_n, w.packed, w.scales, w.zeros, w.group_len, k)
            assert torch.equal(dx, dense)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dequantize_kernel_is_exact(device):
    """The Triton dequantization kernel writes exactly Int4Weight.dequantize(dtype), also for
    ragged N and K (K % 8 != 0, channelwise) and per-word scales (g=32 < the K tile)."""
    dtypes = (torch.float16,) if device == "cpu" else (torch.float16, torch.bfloat16)
    for n, k, group_size, symmetric in ((24, 64, 32, False), (13, 320, 64, True), (7, 100, -1, False),
                                        (40, 512, 256, False)):
        w = _weight(n, k, group_size, symmetric, device=device)
        for dtype in dtypes:
            d = kernels.int4_dequantize(w.packed, w.scales, w.zeros, w.group_len, k, dtype)
            assert torch.equal(d, w.dequantize(dtype)), f"{dtype} n={n} k={k} g={group_size}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_split_k_is_deterministic_and_matches(device):
    w = _weight(40, 512, 32, device=device)
    x = _x(3, 512, torch.float16, device)
    with config_override(Config("dot", 16, 32, 64, 4)):
        a = deepkern.int4_matmul(x, w, backend="triton")
        b = deepkern.int4_matmul(x, w, backend="triton")
    with config_override(Config("dot", 16, 32, 64, 1)):
        c = deepkern.int4_matmul(x, w, backend="triton")
    assert torch.equal(a, b)
    assert_close(a, c.double(), torch.float16)


@needs_interpreter
def test_gemv_bf16_in_interpreter():
    """The GEMV kernel has no tl.dot, so bf16 runs in the interpreter too (launcher direct)."""
    w = _weight(40, 256, 64, dtype=torch.bfloat16)
    x = _x(1, 256, torch.bfloat16, "cpu")
    y = kernels.int4_matmul_fwd(x, w.packed, w.scales, w.zeros, w.group_len, None, GEMV)
    assert_close(y, _ref(x, w), torch.bfloat16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous_x_and_fp32_bias(device):
    w = _weight(24, 128, 32, device=device)
    base = _x(6, 160, torch.float16, device)
    b = torch.randn(24).to(device)
    for x in (base[:, 16:144], _x(128, 6, torch.float16, device).t(), base[::2, :128]):
        y = deepkern.int4_matmul(x, w, b, backend="triton")
        assert_close(y, _ref(x, w, b), torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_batch(device):
    w = _weight(24, 128, 32, device=device)
    for backend in ("triton", "torch"):
        x = torch.randn(0, 128, dtype=torch.float16, device=device, requires_grad=True)
        y = deepkern.int4_matmul(x, w, backend=backend)
        assert y.shape == (0, 24)
        y.sum().backward()
        assert x.grad.shape == (0, 128)
        assert deepkern.int4_matmul(torch.randn(2, 0, 128, dtype=torch.float16, device=device), w,
                                    backend=backend).shape == (2, 0, 24)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_nan_propagates(device):
    w = _weight(24, 128, 32, device=device)
    for m, config in ((1, GEMV), (4, DOT)):
        x = _x(m, 128, torch.float16, device)
        x[m - 1, 5] = float("nan")
        with config_override(config):
            y = deepkern.int4_matmul(x, w, backend="triton")
        assert torch.isnan(y[m - 1]).all()
        if m > 1:
            assert_close(y[: m - 1], _ref(x[: m - 1], w), torch.float16)


def test_torch_backend_and_fp32():
    w = _weight(24, 128, 64)
    x = torch.randn(5, 128)
    y = deepkern.int4_matmul(x, w)  # fp32: "auto" takes the reference
    assert y.dtype == torch.float32
    assert_close(y, _ref(x, w), torch.float32)
    assert torch.equal(y, int4_matmul_ref(x, w))
    xb = x.to(torch.bfloat16)  # the interpreter's bf16 tl.dot is broken: auto avoids it on CPU
    assert_close(deepkern.int4_matmul(xb, w), _ref(xb, w), torch.bfloat16)


# ------------------------------------------------------------------------------------------
# Backward


def _check_backward(m, n, k, group_size, device, dtype=torch.float16, backend="triton"):
    w = _weight(n, k, group_size, device=device)
    x = _x(m, k, dtype, device).requires_grad_(True)
    b = (torch.randn(n) * 0.1).to(dtype).to(device).requires_grad_(True)
    dy = torch.randn(m, n).to(dtype).to(device)
    y = deepkern.int4_matmul(x, w, b, backend=backend)
    y.backward(dy)
    wd = w.dequantize(dtype).double()
    assert x.grad.dtype == dtype and b.grad.dtype == dtype
    assert_close(x.grad, dy.double() @ wd, dtype, what="dx")
    assert_close(b.grad, dy.double().sum(0), dtype, what="dbias")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("m, n, k, group_size", [(1, 40, 256, 64), (17, 33, 320, 32), (5, 24, 100, -1)])
def test_backward(device, m, n, k, group_size):
    _check_backward(m, n, k, group_size, device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_expanded_gradient_and_x_only(device):
    w = _weight(24, 128, 32, device=device)
    x = _x(4, 128, torch.float16, device).requires_grad_(True)
    deepkern.int4_matmul(x, w, backend="triton").sum().backward()  # stride-0 dy
    assert_close(x.grad, torch.ones(4, 24, dtype=torch.float64) @ w.dequantize().double().cpu(),
                 torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_weight_is_frozen(device):
    w = _weight(24, 128, 32, device=device)
    x = _x(2, 128, torch.float16, device)
    w.scales.requires_grad_(True)
    with pytest.raises(RuntimeError, match="Int4Weight is frozen"):
        deepkern.int4_matmul(x, w, backend="triton")
    with torch.no_grad():
        deepkern.int4_matmul(x, w, backend="triton")  # no graph, no gradient asked: fine
    y = torch.ops.deepkern_triton.int4_matmul(x, w.packed, w.scales, w.zeros, w.group_len, None)
    with pytest.raises(RuntimeError, match="Int4Weight is frozen"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(device, symmetric):
    w = _weight(24, 128, 32, symmetric, device=device)
    for m, bias in ((1, True), (20, False)):
        x = _x(m, 128, torch.float16, device).requires_grad_(True)
        b = torch.randn(24, dtype=torch.float16, device=device, requires_grad=True) if bias else None
        torch.library.opcheck(torch.ops.deepkern_triton.int4_matmul.default,
                              (x, w.packed, w.scales, w.zeros, w.group_len, b))
        dy = torch.randn(m, 24, dtype=torch.float16, device=device)
        torch.library.opcheck(torch.ops.deepkern_triton.int4_matmul_bwd.default,
                              (dy, w.packed, w.scales, w.zeros, w.group_len, 128))


def test_compile_fullgraph_large_m():
    """The backend choice at large M (where auto asks whether the CUDA wgmma kernel runs on
    the device) traces without a graph break."""
    torch._dynamo.reset()
    w = _weight(24, 64, -1)  # channelwise: the wgmma kernel would take it
    x = _x(300, 64, torch.float32, "cpu")
    fn = torch.compile(lambda h: deepkern.int4_matmul(h, w), fullgraph=True, backend="aot_eager")
    assert_close(fn(x), _ref(x, w), torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    lin = deepkern.nn.Int4Linear(128, 64, group_size=32, device=device, backend="triton")
    w = _weight(24, 64, 32, symmetric=True, device=device)

    def fn(x):
        h = torch.nn.functional.gelu(lin(x))
        return deepkern.int4_matmul(h, w, backend="triton").float().square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = _x(6, 128, torch.float16, device).requires_grad_(True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = fn(x2)
    ref.backward()
    assert_close(out, ref.double(), torch.float16)
    assert_close(x.grad, x2.grad.double(), torch.float16)
    assert_close(lin.bias.grad, lin.bias.grad.double(), torch.float16)


@pytest.mark.cuda
def test_cuda_graph_capture():
    w = _weight(4096, 4096, 128, device="cuda")
    b = torch.randn(4096, dtype=torch.float16, device="cuda")
    for m in (1, 16, 300):
        x = _x(m, 4096, torch.float16, "cuda")
        deepkern.int4_matmul(x, w, b, backend="triton")  # warm up (compile)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = deepkern.int4_matmul(x, w, b, backend="triton")
        x.copy_(_x(m, 4096, torch.float16, "cuda"))  # new data, same buffers
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, _ref(x, w, b), torch.float16)


# ------------------------------------------------------------------------------------------
# GPU shapes (the issue's), bf16


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 13, 16, 17, 64, 300, 1024])
def test_forward_gpu_batch_sizes(dtype, m):
    _check(m, 4096, 4096, 128, dtype=dtype, device="cuda", bias=True)
    _check(m, 13, 10944, 64, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_gpu_group_sizes(dtype, group_size, symmetric):
    for m in (1, 16, 100):
        _check(m, 1000, 7392 if group_size in (32, -1) else 11008 if group_size == 128 else 4096,
               group_size, symmetric, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("config", [GEMV, GEMV_PREFETCH, DOT, DOT_NOSPLIT, DOT_SWAP, Config("dot", 64, 64, 128, 3),
                                    Config("dot", 16, 128, 128, 0, swap=True),
                                    Config("dot", 64, 128, 64, 1, num_warps=8, swap=True),
                                    Config("gemv", 1, 64, 512, 0, num_warps=8)], ids=str)
def test_forward_gpu_every_config(config):
    for dtype in (torch.float16, torch.bfloat16):
        _check(7, 77, 10944, 64, dtype=dtype, device="cuda", config=config, bias=True)
        _check(7, 50, 1000, -1, dtype=dtype, device="cuda", config=config)


@pytest.mark.cuda
def test_forward_gpu_table_configs():
    """Every row of the table for this GPU at the bench shape (8192x8192)."""
    kind, _ = kernels.device_facts(torch.device("cuda"))
    rows = kernels.CONFIGS.get(kind, kernels.CONFIGS["default"])
    for max_m, _, _, config in rows:
        m = min(max_m, 2048)
        with config_override(config):
            _check(m, 8192, 8192, 128, dtype=torch.bfloat16, device="cuda")


@pytest.mark.cuda
def test_dequantization_is_exact_gpu():
    for dtype in (torch.float16, torch.bfloat16):
        for group_size in (32, 128, -1):
            w = _weight(96, 512, group_size, device="cuda")
            dense = w.dequantize(dtype)
            for config in (GEMV, DOT, Config("dot", 128, 128, 64, 1, num_warps=8), DOT_SWAP,
                           Config("dot", 64, 128, 128, 1, num_warps=8, swap=True)):
                y = kernels.int4_matmul_fwd(torch.eye(512, dtype=dtype, device="cuda"), w.packed,
                                            w.scales, w.zeros, w.group_len, None, config)
                assert torch.equal(y, dense.T), f"{config} {dtype} g={group_size}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, group_size", [(1, 4096, 4096, 128), (300, 13, 10944, 64),
                                                 (1024, 4096, 4096, -1), (17, 1000, 7392, 32)])
def test_backward_gpu(dtype, m, n, k, group_size):
    _check_backward(m, n, k, group_size, "cuda", dtype)


@pytest.mark.cuda
def test_gpu_deterministic():
    w = _weight(8192, 8192, 128, device="cuda")
    for m in (1, 16, 64):
        x = _x(m, 8192, torch.bfloat16, "cuda")
        a = deepkern.int4_matmul(x, w, backend="triton")
        assert torch.equal(a, deepkern.int4_matmul(x, w, backend="triton"))


@pytest.mark.cuda
def test_module_gpu_auto():
    lin = torch.nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    mod = deepkern.nn.Int4Linear.from_linear(lin, group_size=128)
    x = _x(8, 4096, torch.bfloat16, "cuda")
    assert_close(mod(x), _ref(x, mod.weight, lin.bias), torch.bfloat16)


# ------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda w: (torch.randn(2, 128).int(), w), TypeError, "x.dtype must be float16 or bfloat16"),
        (lambda w: (torch.randn(2, 128).double(), w), TypeError, "x.dtype must be"),
        (lambda w: (torch.randn(2, 96).half(), w), ValueError, r"x.shape\[-1\] must equal the weight's K=128"),
        (lambda w: (torch.tensor(1.0).half(), w), ValueError, r"x.shape\[-1\] must equal"),
        (lambda w: ([1.0], w), TypeError, "x must be a torch.Tensor"),
        (lambda w: (torch.randn(2, 128).half(), w.dequantize()), TypeError, "w must be a deepkern.quant.Int4Weight"),
        (lambda w: (torch.randn(2, 128).half(), w, torch.randn(23).half()), ValueError, r"bias.shape must be \(24,\)"),
        (lambda w: (torch.randn(2, 128).half(), w, torch.randn(24).double()), TypeError, "bias.dtype"),
        (lambda w: (torch.randn(2, 128).half(), w, None, "cudnn"), ValueError, "backend='cudnn'"),
    ],
)
def test_bad_input(make, exc, match):
    w = _weight(24, 128, 32)
    with pytest.raises(exc, match=match):
        deepkern.int4_matmul(*make(w))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_backend_refusals(device):
    w = _weight(24, 128, 32, device=device)
    if device == "cpu":
        with pytest.raises(deepkern.BackendUnavailableError, match="backend 'cuda' cannot serve"):
            deepkern.int4_matmul(torch.randn(2, 128, device=device).half(), w, backend="cuda")
    with pytest.raises(deepkern.BackendUnavailableError, match="float32 runs on backend='torch'"):
        deepkern.int4_matmul(torch.randn(2, 128, device=device), w, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        with config_override(Config("dot", 16, 48, 64)):
            pass


@pytest.mark.cuda
def test_device_mismatch():
    w = _weight(24, 128, 32)
    with pytest.raises(ValueError, match="x is on cuda:0, the Int4Weight on cpu"):
        deepkern.int4_matmul(torch.randn(2, 128, device="cuda", dtype=torch.float16), w)
    with pytest.raises(ValueError, match="bias is on cpu"):
        deepkern.int4_matmul(torch.randn(2, 128, device="cuda", dtype=torch.float16), w.cuda(),
                             torch.randn(24, dtype=torch.float16))


# ------------------------------------------------------------------------------------------
# CUDA kernels (csrc/int4_matmul/): K % 32 == 0; small_m_kernel for M <= 16, tile_kernel beyond


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("n, k, group_size", [(4096, 4096, 128), (13, 10944, 64), (1000, 7392, 32),
                                              (77, 4096, 256), (100, 2080, -1)])
def test_cuda_forward(dtype, m, n, k, group_size):
    """Ragged N (13, 77, 100: partial CTAs and warps), K not a multiple of 128 (10944, 2080)."""
    for symmetric in (False, True):
        _check(m, n, k, group_size, symmetric, dtype=dtype, device="cuda", backend="cuda",
               bias=symmetric)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", ["2", "4"])
@pytest.mark.parametrize("splits", ["1", "3", "64"])
def test_cuda_split_k(monkeypatch, splits, batch):
    """One split (bias added in the main kernel), a ragged split count, more splits than fit;
    both batch depths of the one-x-tile kernel."""
    monkeypatch.setenv("DEEPKERN_INT4_SPLITS", splits)
    monkeypatch.setenv("DEEPKERN_INT4_BATCH", batch)
    for dtype in (torch.float16, torch.bfloat16):
        _check_cuda_splits(5, 3, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", ["auto", "1", "3"])
def test_cuda_warp_k_split(monkeypatch, splits):
    """The small-M kernel with its 4 warps on one 16-row block, each taking every 4th batch of
    the split's K (DEEPKERN_INT4_KSPLIT=4): M 1..16 (one and two x tiles), ragged N and K,
    group sizes, both batch depths, grid splits or none."""
    monkeypatch.setenv("DEEPKERN_INT4_KSPLIT", "4")
    if splits != "auto":
        monkeypatch.setenv("DEEPKERN_INT4_SPLITS", splits)
    for dtype in (torch.float16, torch.bfloat16):
        _check_cuda_splits(5, 3, dtype)
        for m in (1, 8, 13, 16):
            _check(m, 77, 4096, 256, dtype=dtype, device="cuda", backend="cuda", bias=True)
            _check(m, 13, 10944, 64, True, dtype=dtype, device="cuda", backend="cuda")
    monkeypatch.setenv("DEEPKERN_INT4_BATCH", "2")
    _check(2, 1000, 7392, 32, dtype=torch.float16, device="cuda", backend="cuda")


def _check_cuda_splits(m_ragged, m, dtype):
    """The CUDA kernels under a forced split count: ragged N and K with an x-dtype bias, then
    an fp32 bias; the same bits on a second call."""
    _check(m_ragged, 300, 4224, 64, dtype=dtype, device="cuda", backend="cuda", bias=True)
    w = _weight(64, 1024, 128, device="cuda")
    x = _x(m, 1024, dtype, "cuda")
    b = torch.randn(64, device="cuda")  # fp32 bias
    y = deepkern.int4_matmul(x, w, b, backend="cuda")
    assert_close(y, _ref(x, w, b), dtype)
    assert torch.equal(y, deepkern.int4_matmul(x, w, b, backend="cuda"))  # deterministic


@pytest.mark.cuda
def test_cuda_dequantization_is_exact():
    """Identity rows of x read the dense weight back bit for bit (scales in x's dtype)."""
    for dtype in (torch.float16, torch.bfloat16):
        for group_size, symmetric in ((32, False), (128, True), (-1, False)):
            w = _weight(40, 256, group_size, symmetric, device="cuda", dtype=dtype)
            dense = w.dequantize(dtype)
            for rows in (torch.arange(16), torch.randperm(256)[:16], torch.tensor([255])):
                x = torch.eye(256, dtype=dtype, device="cuda")[rows.cuda()]
                y = deepkern.int4_matmul(x, w, backend="cuda")
                assert torch.equal(y, dense.T[rows.cuda()]), f"{dtype} g={group_size} rows={rows[:4]}"


@pytest.mark.cuda
def test_cuda_layouts_and_determinism():
    w = _weight(512, 4096, 128, device="cuda")
    base = _x(4, 4097, torch.float16, "cuda")
    x = base[:, 1:]  # rows not 16-byte aligned: the op copies them
    y = deepkern.int4_matmul(x, w, backend="cuda")
    assert_close(y, _ref(x, w), torch.float16)
    assert torch.equal(y, deepkern.int4_matmul(x.contiguous(), w, backend="cuda"))
    assert torch.equal(y, deepkern.int4_matmul(x, w, backend="cuda"))
    flat = torch.empty(4 * 4096 + 1, dtype=torch.float16, device="cuda")
    x_odd = flat[1:].view(4, 4096).copy_(x)  # contiguous, but 2 bytes off 16-byte alignment
    assert torch.equal(y, deepkern.int4_matmul(x_odd, w, backend="cuda"))
    x3 = _x(3, 4096, torch.float16, "cuda", batch=(2,))  # [2, 3, K] -> 6 rows
    assert_close(deepkern.int4_matmul(x3, w, backend="cuda"), _ref(x3, w), torch.float16)
    ws = quantize_int4((torch.randn(64, 256) * 0.05).float(), 64).to("cuda")  # fp32 scales
    xs = _x(2, 256, torch.bfloat16, "cuda")
    assert_close(deepkern.int4_matmul(xs, ws, backend="cuda"), _ref(xs, ws), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("m, n, k, group_size", [(1, 4096, 4096, 128), (16, 1000, 7392, 32)])
def test_cuda_backward(m, n, k, group_size):
    for dtype in (torch.float16, torch.bfloat16):
        _check_backward(m, n, k, group_size, "cuda", dtype, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile", ["0", "1", "2", "3", "4"])
@pytest.mark.parametrize("m", [17, 65, 300])
def test_cuda_tile_forward(monkeypatch, dtype, tile, m):
    """The kernels for M > 16, each forced (mma.sync tiles 256 x 32 / 256 x 128; 2, 3, 4: the
    Hopper wgmma kernel with 64 / 128 / 256 x rows, for groups >= 128 and channelwise, the
    others then on tile 1): x rows
    not a multiple of the tile, ragged N (13, 77, 100, 300: partial warps and CTAs), K not a
    multiple of 128 (10944, 2080), every group size, symmetric and asymmetric, bias."""
    monkeypatch.setenv("DEEPKERN_INT4_TILE", tile)
    for n, k, group_size, symmetric in ((1024, 4096, 128, False), (13, 10944, 64, True), (300, 7392, 32, False),
                                        (77, 4096, 256, True), (100, 2080, -1, False)):
        _check(m, n, k, group_size, symmetric, dtype=dtype, device="cuda", backend="cuda", bias=not symmetric)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [33, 64, 130])
def test_cuda_wgmma_small_k(m):
    """The default kernel past M = 32 (the Hopper wgmma kernel where it runs) on channelwise
    weights with K below one 128-wide step or its 64-wide x box (tensor maps smaller than
    their boxes), and on K = 160 (a partial second step)."""
    for k in (32, 96, 160):
        for dtype in (torch.float16, torch.bfloat16):
            _check(m, 200, k, -1, False, dtype=dtype, device="cuda", backend="cuda", bias=True)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", ["1", "3", "64"])
def test_cuda_tile_split_k(monkeypatch, splits):
    """One split, a ragged split count, one K step per split (fewer than the ring's stages)."""
    monkeypatch.setenv("DEEPKERN_INT4_SPLITS", splits)
    for tile in ("0", "1", "2", "3", "4"):  # 2-4: the wgmma kernel with 64 / 128 / 256 x rows
        monkeypatch.setenv("DEEPKERN_INT4_TILE", tile)
        for dtype in (torch.float16, torch.bfloat16):
            _check_cuda_splits(40, 130, dtype)


@pytest.mark.cuda
def test_cuda_tile_exact_and_layouts():
    """Identity rows of x read the dense weight back bit for bit through every tile; scales
    in another dtype (converted to x's), unaligned rows."""
    for dtype in (torch.float16, torch.bfloat16):
        for group_size in (32, 128, -1):  # 128 and channelwise: the wgmma kernel on Hopper
            w = _weight(300, 512, group_size, device="cuda", dtype=dtype)
            dense = w.dequantize(dtype)
            for rows in (torch.arange(512), torch.randperm(512)[:40]):
                x = torch.eye(512, dtype=dtype, device="cuda")[rows.cuda()]
                y = deepkern.int4_matmul(x, w, backend="cuda")
                assert torch.equal(y, dense.T[rows.cuda()]), f"{dtype} g={group_size} M={len(rows)}"
    ws = quantize_int4((torch.randn(64, 256) * 0.05).float(), 64).to("cuda")  # fp32 scales
    xs = _x(100, 256, torch.bfloat16, "cuda")
    assert_close(deepkern.int4_matmul(xs, ws, backend="cuda"), _ref(xs, ws), torch.bfloat16)
    # Scales in another dtype are rounded to x's inside both kernels: the same bits as with
    # the scales converted beforehand.
    for x_dtype, s_dtype in ((torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        for group_size in (64, 128):  # M=130: tile 1, or the wgmma kernel on Hopper
            w = _weight(300, 512, group_size, device="cuda")
            w = Int4Weight(w.packed, w.scales.to(s_dtype), w.zeros, w.n, w.k, w.group_size)
            w_x = Int4Weight(w.packed, w.scales.to(x_dtype), w.zeros, w.n, w.k, w.group_size)
            for m in (5, 40, 130):
                x = _x(m, 512, x_dtype, "cuda")
                assert torch.equal(deepkern.int4_matmul(x, w, backend="cuda"),
                                   deepkern.int4_matmul(x, w_x, backend="cuda")), f"{x_dtype} {s_dtype} g={group_size} M={m}"
    w = _weight(512, 4096, 128, device="cuda")
    x = _x(70, 4097, torch.float16, "cuda")[:, 1:]  # rows not 16-byte aligned
    assert torch.equal(deepkern.int4_matmul(x, w, backend="cuda"), deepkern.int4_matmul(x.contiguous(), w, backend="cuda"))
    assert_close(deepkern.int4_matmul(x, w, backend="cuda"), _ref(x, w), torch.float16)


def test_auto_order(monkeypatch):
    """auto: CUDA first up to M=32; beyond, CUDA where the wgmma kernel runs (Hopper, groups
    >= 128 or channelwise), else Triton."""
    import importlib

    op = importlib.import_module("deepkern.ops.int4_matmul")
    dev = torch.device("cuda", 0)
    for wgmma in (False, True):
        monkeypatch.setattr(op, "_wgmma_device", lambda device, w=wgmma: w)
        assert op._auto_order(1, dev, 4096, 128)[0] == "cuda"
        assert op._auto_order(32, dev, 4096, 128)[0] == "cuda"
        assert op._auto_order(33, dev, 4096, 128)[0] == ("cuda" if wgmma else "triton")
        assert op._auto_order(255, dev, 4096, 128)[0] == ("cuda" if wgmma else "triton")
        assert op._auto_order(33, dev, 4096, 64)[0] == "triton"  # groups < 128: no wgmma kernel
        assert op._auto_order(4096, dev, 4096, 4096)[0] == ("cuda" if wgmma else "triton")  # channelwise
        assert op._auto_order(4096, dev, 4096, 64)[0] == "triton"  # groups < 128: no wgmma kernel


@pytest.mark.cuda
def test_cuda_refusals_and_auto():
    w100 = _weight(24, 100, -1, device="cuda")
    with pytest.raises(deepkern.BackendUnavailableError, match="multiples of 32"):
        deepkern.int4_matmul(_x(1, 100, torch.float16, "cuda"), w100, backend="cuda")
    # auto still serves that shape (Triton)
    x100 = _x(1, 100, torch.float16, "cuda")
    assert_close(deepkern.int4_matmul(x100, w100), _ref(x100, w100), torch.float16)


@pytest.mark.cuda
def test_cuda_graph_several_launches():
    """Split-K (the splits' fp32 partials summed by a second kernel) under CUDA graphs: two
    graphs with several launches each (one weight at several M: small-M, tile and wgmma
    kernels), replayed alternately and repeatedly on fresh inputs, eager calls in between
    (the same bits as the replay)."""
    w = _weight(4096, 8192, 128, device="cuda")
    b = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    graphs = []
    for ms in ((1, 2, 16), (4, 8, 96, 300)):
        xs = [_x(m, 8192, torch.bfloat16, "cuda") for m in ms]
        for x in xs:
            deepkern.int4_matmul(x, w, b, backend="cuda")  # eager warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = [deepkern.int4_matmul(x, w, b, backend="cuda") for x in xs]
        graphs.append((graph, xs, ys))
    for _ in range(3):
        for graph, xs, ys in graphs:
            for x in xs:
                x.copy_(_x(x.shape[0], 8192, torch.bfloat16, "cuda"))
            for y in ys:
                y.fill_(float("nan"))
            graph.replay()
            eager = deepkern.int4_matmul(xs[0], w, b, backend="cuda")
            torch.cuda.synchronize()
            for x, y in zip(xs, ys):
                assert_close(y, _ref(x, w, b), torch.bfloat16)
            assert torch.equal(eager, ys[0])


@pytest.mark.cuda
@pytest.mark.parametrize("m", [4, 64, 256])
def test_cuda_graph_and_compile(m):
    """The kernels (M=4: small-M, M=64: tile, M=256: wgmma on Hopper) captured in a CUDA graph
    and under torch.compile."""
    w = _weight(2048, 4096, 128, device="cuda")
    x = _x(m, 4096, torch.bfloat16, "cuda")
    deepkern.int4_matmul(x, w, backend="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = deepkern.int4_matmul(x, w, backend="cuda")
    x.copy_(_x(m, 4096, torch.bfloat16, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, _ref(x, w), torch.bfloat16)
    fn = torch.compile(lambda h: deepkern.int4_matmul(h, w, backend="cuda"), fullgraph=True)
    assert_close(fn(x), _ref(x, w), torch.bfloat16)
