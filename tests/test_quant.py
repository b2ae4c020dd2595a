"""deepkern.quant (INT4 format, quantizer, Int4Weight) and deepkern.nn.Int4Linear /
quantize_model: packing, error bounds, slicing, state dicts, model conversion."""

import pytest
import torch
from conftest import KERNEL_DEVICES
from helpers import assert_close

import deepkern
from deepkern.nn import Int4Linear, quantize_model
from deepkern.quant import GROUP_SIZES, Int4Weight, pack_int4, quantize_int4, unpack_int4
from deepkern.quant.int4 import int4_nbytes
from deepkern.reference import int4_matmul_ref

# ------------------------------------------------------------------------------------------
# Packing


def test_pack_layout_bits():
    """Nibble i of word j holds code 8j+i; bit 31 set gives a negative int32."""
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 0]])
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x87654321 - 2**32
    assert packed[0, 1].item() == 0xF


@pytest.mark.parametrize("k", [8, 64, 100, 13])
def test_pack_unpack_roundtrip(k):
    q = torch.randint(0, 16, (7, k), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, (k + 7) // 8)
    assert torch.equal(unpack_int4(packed, k), q)


# ------------------------------------------------------------------------------------------
# Quantizer


def _check_bound(w, q: Int4Weight):
    """|w - dequantize()| <= scale/2 everywhere (the fp32 dequantization is exact)."""
    g = q.group_len
    s = q.scales.float().t().repeat_interleave(g, dim=1)
    err = (w.float() - q.dequantize(torch.float32)).abs()
    worst = (err / (s * 0.5)).max().item()
    assert worst <= 1.0 + 1e-5, f"error reaches {worst:.4f} x scale/2"


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_error_bound(group_size, symmetric, dtype):
    n, k = 24, 512
    w = (torch.randn(n, k) * 0.05 + 0.01).to(dtype)
    w[3] = w[3].abs() + 0.1  # a row of all-positive groups: lo clamps to 0
    w[5] = 0.0  # an all-zero row
    q = quantize_int4(w, group_size, symmetric)
    g = k if group_size == -1 else group_size
    assert q.shape == (n, k) and q.group_len == g and q.num_groups == k // g
    assert q.packed.shape == (n, k // 8) and q.scales.shape == (k // g, n) and q.scales.dtype == dtype
    assert q.symmetric == symmetric and (q.zeros is None) == symmetric
    if not symmetric:
        assert q.zeros.dtype == torch.uint8 and int(q.zeros.max()) <= 15
    _check_bound(w, q)
    assert torch.equal(q.dequantize()[5], torch.zeros(k, dtype=dtype))
    rel = ((q.dequantize(torch.float32) - w.float()).norm() / w.float().norm()).item()
    assert rel < 0.15, f"4-bit RTN relative error {rel:.3f} unexpectedly large"  # ~0.12 channelwise


def test_quantize_rule_by_hand():
    w = torch.linspace(-1.0, 2.0, 32).unsqueeze(0)
    q = quantize_int4(w, 32)
    assert q.scales.item() == pytest.approx(0.2) and q.zeros.item() == 5
    codes = unpack_int4(q.packed, 32)[0]
    assert codes[0] == 0 and codes[-1] == 15
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([-7.0, -3.5, 2.5, 7.0])
    q = quantize_int4(w, 32, symmetric=True)
    assert q.scales.item() == 1.0 and q.zeros is None
    codes = unpack_int4(q.packed, 32)[0]
    assert codes[:5].tolist() == [1, 4, 10, 15, 8]  # round half to even, + 8


def test_dequantize_rounds_once():
    w = torch.randn(16, 256)
    q = quantize_int4(w.half(), 64)
    exact = q.dequantize(torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(q.dequantize(dtype), exact.to(dtype))
    assert q.dequantize().dtype == torch.float16


def test_channelwise_odd_k():
    w = torch.randn(5, 100)
    q = quantize_int4(w, -1)
    assert q.packed.shape == (5, 13) and q.scales.shape == (1, 5)
    _check_bound(w, q)


# ------------------------------------------------------------------------------------------
# Int4Weight: slicing, moves, validation


def _same(a: Int4Weight, b: Int4Weight):
    assert (a.n, a.k, a.group_size) == (b.n, b.k, b.group_size)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
    assert (a.zeros is None) == (b.zeros is None)
    if a.zeros is not None:
        assert torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_narrow_commutes_with_pack(group_size, symmetric):
    w = torch.randn(21, 1024, dtype=torch.float16)
    q = quantize_int4(w, group_size, symmetric)
    _same(q.narrow(0, 3, 11), quantize_int4(w[3:14], group_size, symmetric))
    k0, k = group_size, 2 * group_size
    _same(q.narrow(1, k0, k), quantize_int4(w[:, k0 : k0 + k], group_size, symmetric))
    shard = q.narrow(0, 20, 1).narrow(1, 1024 - group_size, group_size)
    assert torch.equal(shard.dequantize(), q.dequantize()[20:, 1024 - group_size :])
    with pytest.raises(ValueError, match="multiples of group_size"):
        q.narrow(1, group_size // 2, group_size)
    with pytest.raises(ValueError, match="start \\+ length"):
        q.narrow(0, 20, 2)


def test_narrow_channelwise():
    w = torch.randn(6, 200)
    q = quantize_int4(w, -1)
    for k0, k in ((0, 200), (8, 100), (96, 104), (16, 3)):
        part = q.narrow(1, k0, k)
        assert part.k == k and torch.equal(part.dequantize(), q.dequantize()[:, k0 : k0 + k])
    with pytest.raises(ValueError, match="multiples of 8"):
        q.narrow(1, 4, 8)


def test_to_and_bytes():
    q = quantize_int4(torch.randn(10, 256, dtype=torch.bfloat16), 128)
    assert q.nbytes == int4_nbytes(10, 256, 128, False) == 10 * 32 * 4 + 2 * 10 * 3
    q32 = q.to(torch.float32)
    assert q32.scales.dtype == torch.float32 and torch.equal(q32.dequantize(), q.dequantize(torch.float32))
    assert q.to("cpu").device == torch.device("cpu") and q.cpu().packed is not None
    assert "N=10, K=256, group_size=128" in repr(q)
    with pytest.raises(TypeError, match="dtype must be"):
        q.to(torch.int8)


def test_int4weight_validation():
    q = quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match=r"packed must be an int32 tensor of shape \(4, 8\)"):
        Int4Weight(q.packed.float(), q.scales, q.zeros, 4, 64, 32)
    with pytest.raises(ValueError, match=r"scales must be .* shape \(2, 4\)"):
        Int4Weight(q.packed, q.scales.t(), q.zeros, 4, 64, 32)
    with pytest.raises(ValueError, match="zeros must be None"):
        Int4Weight(q.packed, q.scales, q.zeros.int(), 4, 64, 32)
    with pytest.raises(ValueError, match="layout_version 2"):
        Int4Weight(q.packed, q.scales, q.zeros, 4, 64, 32, layout_version=2)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight(q.packed, q.scales, q.zeros, 4, 64, 48)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(4, 96), 64), ValueError, "K=96 .* not divisible by group_size=64"),
        ((torch.randn(4, 96), 16), ValueError, "group_size must be one of 32, 64, 128, 256, -1"),
        ((torch.randn(4, 96), True), ValueError, "group_size must be one of"),
        ((torch.randn(96), 32), ValueError, "2-D"),
        ((torch.randn(4, 96).int(), 32), TypeError, "weight.dtype"),
        ((torch.full((4, 96), float("nan")), 32), ValueError, "NaN or Inf"),
        (([1.0], 32), TypeError, "torch.Tensor"),
    ],
)
def test_quantize_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        quantize_int4(*args)


# ------------------------------------------------------------------------------------------
# Int4Linear and quantize_model


def test_int4linear_state_dict_roundtrip():
    torch.manual_seed(3)
    a = Int4Linear(256, 40, group_size=64)
    b = Int4Linear(256, 40, group_size=64)
    assert not torch.equal(a.packed, b.packed)  # random init, like nn.Linear
    sd = a.state_dict()
    assert set(sd) == {"packed", "scales", "zeros", "bias", "_extra_state"}
    b.load_state_dict(sd)
    for key in ("packed", "scales", "zeros", "bias"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    x = torch.randn(3, 256, dtype=torch.float16)
    assert torch.equal(a(x), b(x))
    sym = Int4Linear(256, 40, group_size=64, symmetric=True, bias=False)
    assert set(sym.state_dict()) == {"packed", "scales", "_extra_state"}
    with pytest.raises(ValueError, match="differs from this module"):
        Int4Linear(256, 40, group_size=64, symmetric=True).load_state_dict(sd, strict=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Int4Linear(256, 40, group_size=32).load_state_dict(
            {k: v for k, v in sd.items() if k != "_extra_state"}, strict=False
        )


def test_int4linear_from_linear_and_moves():
    lin = torch.nn.Linear(128, 24).half()
    mod = Int4Linear.from_linear(lin, group_size=32)
    assert "in_features=128, out_features=24" in repr(mod)
    w = mod.weight
    assert isinstance(w, Int4Weight) and w.shape == (24, 128)
    _check_bound(lin.weight.detach(), w)
    x = torch.randn(5, 128, dtype=torch.float16)
    ref = x.double() @ w.dequantize().double().T + lin.bias.double()
    assert_close(mod(x), ref, torch.float16)
    ref32 = x.double() @ w.dequantize(torch.float32).double().T + lin.bias.double()
    m32 = mod.float()  # scales and bias to fp32 (exact), codes untouched
    assert m32.scales.dtype == torch.float32 and m32.packed.dtype == torch.int32
    assert_close(m32(x.float()), ref32, torch.float32)  # fp32 x: the torch backend
    assert Int4Linear.from_linear(torch.nn.Linear(64, 8, bias=False), -1).bias is None


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_features=100, out_features=8, group_size=64), ValueError, "K=100 .* not divisible"),
        (dict(in_features=128, out_features=8, group_size=48), ValueError, "group_size must be one of"),
        (dict(in_features=0, out_features=8), ValueError, "in_features must be a positive int"),
        (dict(in_features=128, out_features=8, dtype=torch.int8), TypeError, "dtype must be"),
    ],
)
def test_int4linear_bad_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Int4Linear(**kwargs)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(128, 96)
        self.odd = torch.nn.Linear(96, 96)
        self.lm_head = torch.nn.Linear(96, 10)

    def forward(self, x):
        return self.lm_head(self.odd(self.fc2(self.act(self.fc1(x)))))


def test_quantize_model_small_mlp(capsys):
    torch.manual_seed(5)
    model = _MLP().half()
    dense = _MLP().half()
    dense.load_state_dict(model.state_dict())
    assert deepkern.quantize_model is quantize_model
    summary = quantize_model(model, group_size=32, skip=("lm_head",))
    assert summary.replaced == ["fc1", "fc2", "odd"]
    assert summary.skipped == {"lm_head": "matches skip pattern 'lm_head'"}
    assert isinstance(model.fc1, Int4Linear) and type(model.lm_head) is torch.nn.Linear
    dense_bytes = sum(m.weight.numel() * 2 + m.bias.numel() * 2 for m in (dense.fc1, dense.fc2, dense.odd))
    assert summary.bytes_before == dense_bytes and summary.bytes_after < dense_bytes / 3
    assert "3 Linear layers replaced" in str(summary)
    assert "quantize_model: [3/3] odd (96x96)" in capsys.readouterr().err
    x = torch.randn(7, 64, dtype=torch.float16)
    out = model(x)
    # Same layers with the dequantized weights as dense fp64 Linears: the kernel's contract.
    h = x.double()
    for name in ("fc1", "fc2", "odd"):
        m = getattr(model, name)
        h = int4_matmul_ref(h, m.weight, m.bias)
        if name == "fc1":
            h = torch.nn.functional.gelu(h)
    ref = torch.nn.functional.linear(h, dense.lm_head.weight.double(), dense.lm_head.bias.double())
    assert_close(out, ref, torch.float16, scale=3.0)  # three fp16 roundings of activations
    # And against the unquantized model: 4-bit weights, g=32 (measured 7.4% with this seed).
    rel = ((out.double() - dense(x).double()).norm() / dense(x).double().norm()).item()
    assert rel < 0.15, f"quantized MLP drifts {rel:.3f} from the dense one"
    sd = model.state_dict()
    again = _MLP().half()
    quantize_model(again, group_size=32, quiet=True)
    again.load_state_dict(sd)
    assert torch.equal(again(x), out)
    assert capsys.readouterr().err == ""


def test_quantize_model_shared_and_special_modules():
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.ModuleDict({
        "a": torch.nn.Sequential(shared, torch.nn.ReLU()),
        "b": torch.nn.Sequential(shared),
        "attn": torch.nn.MultiheadAttention(64, 4),
        "small": torch.nn.Linear(48, 8),
    })
    summary = quantize_model(model, group_size=64, skip=(), quiet=True)
    assert summary.replaced == ["a.0"]
    assert model["a"][0] is model["b"][0] and isinstance(model["b"][0], Int4Linear)
    assert "subclass of nn.Linear" in summary.skipped["attn.out_proj"]
    assert "not divisible by group_size=64" in summary.skipped["small"]
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_model(model, group_size=100)
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model("model")


@pytest.mark.cuda
def test_int4linear_cuda_moves():
    mod = Int4Linear(512, 96, group_size=128)
    x = torch.randn(4, 512, dtype=torch.float16)
    ref = mod(x)
    gpu = mod.cuda()
    assert gpu.packed.is_cuda and gpu.scales.is_cuda and gpu.zeros.is_cuda and gpu.weight.device.type == "cuda"
    assert_close(gpu(x.cuda()), ref.double(), torch.float16, scale=2.0)
    q = quantize_int4(torch.randn(8, 64, device="cuda"), 32)
    assert q.cpu().device.type == "cpu" and q.cpu().cuda().device.type == "cuda"
    with pytest.raises(ValueError, match="scales is on cpu"):
        Int4Weight(q.packed, q.scales.cpu(), q.zeros, 8, 64, 32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_quantize_on_device(device):
    w = torch.randn(300, 256, device=device)
    q = quantize_int4(w, 64)
    assert q.device.type == device
    _check_bound(w.cpu(), q.cpu())
