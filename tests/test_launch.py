"""deepkern.triton_kernels._launch: the cached Triton launch must pick the kernel Triton would
(alignment and int specializations) and give the same results as the plain launch."""

import pytest
import torch
from helpers import assert_close

import deepkern
from deepkern.reference import layernorm_gelu_ref


def _check(x, w, b):
    y = deepkern.layernorm_gelu(x, w, b, backend="triton")
    ref = layernorm_gelu_ref(x.double(), w.double(), b.double(), 1e-5, "none", None, "layernorm")
    assert_close(y, ref, x.dtype, what=f"y {tuple(x.shape)} ptr%16={x.data_ptr() % 16}")


@pytest.mark.cuda
def test_fast_launch_enabled_on_tested_triton():
    import triton

    from deepkern.triton_kernels import _launch

    if not triton.__version__.startswith("3.6"):
        pytest.skip(f"fast launch verified on Triton 3.6 only (have {triton.__version__})")
    assert _launch.enabled(), "Triton's JITFunction.run no longer launches as _launch assumes"


@pytest.mark.cuda
def test_fast_launch_respects_specialization():
    torch.manual_seed(0)
    n = 1024
    w = torch.rand(n, device="cuda", dtype=torch.float16) + 0.5
    b = torch.randn(n, device="cuda", dtype=torch.float16)
    big = torch.randn(8, n + 8, device="cuda", dtype=torch.float16)
    for _ in range(3):  # first call fills the cache, the others hit it
        _check(big[:, :n], w, b)
    # Same shapes, x no longer 16-byte aligned: must not reuse the aligned kernel.
    for _ in range(2):
        _check(big[:, 1 : n + 1], w, b)
    # Row stride 1 (a 1-element row) and 16 specialize ints differently.
    for n1 in (16, 1, 16, 1):
        x = torch.randn(5, n1, device="cuda", dtype=torch.float16)
        _check(x, torch.rand(n1, device="cuda", dtype=torch.float16) + 0.5,
               torch.randn(n1, device="cuda", dtype=torch.float16))


@pytest.mark.cuda
def test_fast_launch_backward_and_int4():
    from deepkern.quant import quantize_int4

    torch.manual_seed(1)
    for m in (1, 1, 16, 16):
        wq = quantize_int4(torch.randn(256, 512, device="cuda", dtype=torch.float16) * 0.02, 128)
        x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
        y = deepkern.int4_matmul(x, wq, backend="triton")
        ref = x.double() @ wq.dequantize(torch.float16).double().T
        assert_close(y, ref, torch.float16, what=f"int4 m={m}")
    x = torch.randn(33, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(768, device="cuda", dtype=torch.bfloat16) + 0.5).requires_grad_(True)
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(33, 768, device="cuda", dtype=torch.bfloat16)
    grads = [torch.autograd.grad(deepkern.layernorm_gelu(x, w, b, backend="triton"), (x, w, b), dy)
             for _ in range(3)]
    for g in grads[1:]:  # cached launches: the same bits as the first (deterministic kernels)
        for a, c in zip(g, grads[0]):
            assert torch.equal(a, c)


# CPU checks of the cached launcher's guards (its launches need a GPU).


def test_hook_detection():
    from deepkern.triton_kernels import _launch

    class Chain:  # Triton >= 3.5 keeps a HookChain whose `calls` may be empty
        def __init__(self, calls):
            self.calls = calls

    assert not _launch._hook_active(None)
    assert not _launch._hook_active(Chain([]))
    assert _launch._hook_active(Chain([print]))
    assert _launch._hook_active(print)  # older Triton: a plain callable


@pytest.mark.parametrize("env", [{"TRITON_INTERPRET": "1"}, {"DEEPKERN_TRITON_FAST_LAUNCH": "0"}])
def test_fast_launch_off_switches(monkeypatch, env):
    from deepkern.triton_kernels import _launch

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not _launch._supported()


def test_arg_key_separates_specializations():
    """Whatever Triton specializes a launch on must change the cache key."""
    from deepkern.triton_kernels import _launch

    base = torch.zeros(64, dtype=torch.float16)
    key = _launch._arg_key
    assert key(base) != key(base[1:])  # 16-byte alignment
    assert key(base) != key(base.float())  # dtype
    assert key(16) != key(17) and key(1) != key(2)  # divisible by 16; equal to 1
    assert key(2**31) != key(2**31 - 16)  # 32- vs 64-bit
    assert key(True) != key(1) and key(0.5) == key(2.0)  # bools apart; floats not specialized


def test_arg_key_of_tensor_descriptors():
    """A TensorDescriptor keys on its dtype and block shape (what Triton specializes it on; the
    launcher encodes the tensor map from base, shape and strides at every launch)."""
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    from deepkern.triton_kernels import _launch

    def desc(t, block):
        return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=block)

    a = torch.zeros(128, 64, dtype=torch.float16)
    key = _launch._arg_key
    assert key(desc(a, [32, 64])) == key(desc(torch.ones(256, 64, dtype=torch.float16), [32, 64]))
    assert key(desc(a, [32, 64])) != key(desc(a, [64, 64]))  # block shape
    assert key(desc(a, [32, 64])) != key(desc(a.bfloat16(), [32, 64]))  # dtype
    assert key(desc(a, [32, 64])) != key(a)
