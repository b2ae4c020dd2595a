"""Loads the compiled extension deepkern._C, if it was built. Loading registers the CUDA
ops with torch.ops.deepkern; it does not touch the GPU."""

import importlib

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    _C = importlib.import_module("deepkern._C")
except ModuleNotFoundError:
    _C = None
    _ERROR = "not built (installed without a CUDA toolkit, or with DEEPKERN_BUILD_CUDA=0)"
except ImportError as exc:  # e.g. built against another torch: undefined symbols
    _C = None
    _ERROR = f"failed to load ({exc}); rebuild against the installed torch"
else:
    _ERROR = None


def has_cuda_ext() -> bool:
    """True when the compiled CUDA extension deepkern._C is loaded."""
    return _C is not None


def cuda_ext_error() -> str | None:
    """Why deepkern._C did not load (None when it did)."""
    return _ERROR


def build_info() -> dict:
    """Compile-time facts of the extension (target archs, CUDA runtime version), or {}."""
    return dict(_C.build_info()) if _C is not None else {}
