"""The build: the CUDA extension is compiled wherever a CUDA toolkit was found, every op schema
is registered with a CUDA kernel, and the Python side (fakes, info) is wired up."""

import shutil
import subprocess
import sys

import pytest
import torch

import deepkern
from deepkern import ops


def _build_status():
    try:
        from deepkern._version import cuda_build
    except ImportError:
        return None
    return cuda_build


def test_extension_built_when_toolkit_present():
    status = _build_status()
    assert status is not None, "deepkern/_version.py is missing: was deepkern installed with pip?"
    toolkit = shutil.which("nvcc") is not None and torch.version.cuda is not None
    if status.startswith("disabled"):
        pytest.skip(f"CUDA extension explicitly {status}")
    if toolkit:
        assert status == "built", f"nvcc is on PATH but the extension was not built: {status}"
    if status == "built":
        assert deepkern.has_cuda_ext(), f"built but failed to load: {deepkern.cuda_ext_error()}"


needs_ext = pytest.mark.skipif(not deepkern.has_cuda_ext(), reason="deepkern._C not built")


@needs_ext
@pytest.mark.parametrize("name", ops.CUDA_OPS)
def test_cuda_schemas_registered(name):
    qualname = f"deepkern::{name}"
    assert hasattr(torch.ops.deepkern, name), f"{qualname} has no schema"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), f"{qualname}: no CUDA kernel"


@needs_ext
def test_build_info():
    info = deepkern._ext.build_info()
    assert info["archs"].startswith("sm") and info["cuda_runtime_version"] >= 11000
    assert info["torch_version"] == torch.__version__.split("+")[0], (
        f"built against torch {info['torch_version']}, running {torch.__version__}"
    )


@pytest.mark.parametrize("name", ops.TRITON_OPS)
def test_triton_ops_registered(name):
    assert hasattr(torch.ops.deepkern_triton, name)


def _meta_args():
    x = torch.empty(6, 32, device="meta", dtype=torch.bfloat16)
    w = torch.empty(32, device="meta", dtype=torch.float32)
    return x, w


@pytest.mark.parametrize("ns", ["deepkern", "deepkern_triton"])
def test_fake_impls(ns):
    """Every op has a fake (meta) implementation with the right output metadata."""
    if ns == "deepkern" and not deepkern.has_cuda_ext():
        pytest.skip("deepkern._C not built")
    lib = getattr(torch.ops, ns)
    x, w = _meta_args()
    y, h, mean, rstd = lib.layernorm_gelu_fwd(x, w, w, x, 1e-5, False, False)
    assert y.shape == h.shape == (6, 32) and y.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (6,) and mean.dtype == torch.float32
    _, h0, _, _ = lib.layernorm_gelu_fwd(x, None, None, None, 1e-5, True, True)
    assert h0.shape == (0,)
    dx, dw, db = lib.layernorm_gelu_bwd(x, x, w, None, mean, rstd, False, False)
    assert dx.shape == (6, 32) and dw.shape == (32,) and dw.dtype == torch.float32 and db.shape == (0,)


def test_import_is_quiet_and_does_not_import_triton():
    code = "import sys, deepkern; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr == ""


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "deepkern.info"], capture_output=True, text=True,
                         check=True)
    for word in ("torch", "triton", "gpu", "_C", "layernorm_gelu"):
        assert word in out.stdout
