"""Backend choice: backend="auto" | "cuda" | "triton" | "torch" on every public op.

- "cuda":   the compiled extension (torch.ops.deepkern.*), CUDA tensors only.
- "triton": Triton kernels (torch.ops.deepkern_triton.*), CUDA tensors, or CPU tensors when
            TRITON_INTERPRET=1 (the Triton interpreter; used by the CPU tests).
- "torch":  the plain-PyTorch reference, any device.
- "auto":   the first backend of the op's measured preference order that can serve the call;
            "torch" when nothing else can (e.g. CPU tensors). Never times anything.

The env var DEEPKERN_BACKEND sets the default for calls that pass backend=None; it is then
treated like an explicit request. An explicit backend that cannot serve raises
BackendUnavailableError naming the reason; it never falls back silently.

Each op module computes, per call, a dict {backend: None (can serve) | "reason it cannot"}
from the shared checks below plus its own (dtype, head dim, ...), and calls choose().
It also registers an availability function so `python -m deepkern.info` can report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Mapping, Sequence

import torch

from deepkern._ext import cuda_ext_error, has_cuda_ext

BACKENDS = ("cuda", "triton", "torch")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "DEEPKERN_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message says why."""


def requested(backend: str | None) -> str:
    """The backend asked for: the argument, else $DEEPKERN_BACKEND, else "auto"."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"{source}={backend!r}: expected one of {', '.join(CHOICES)}")
    return backend


def _triton_missing() -> str | None:
    # find_spec, not import: importing triton here would fix its interpreter mode
    # (TRITON_INTERPRET is read when triton's own @jit functions are defined) before the
    # caller had a chance to set it.
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


# A module constant, not a cached function, so torch.compile traces the checks below without
# graph breaks.
_TRITON_IMPORT_ERROR = _triton_missing()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_reason(device: torch.device) -> str | None:
    """Why the compiled extension cannot serve tensors on `device` (None if it can)."""
    if not has_cuda_ext():
        return f"the CUDA extension deepkern._C is {cuda_ext_error()}"
    if device.type != "cuda":
        return f"tensors are on {device.type}, the CUDA backend needs CUDA tensors"
    return None


def triton_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot serve tensors on `device` (None if they can)."""
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"tensors are on {device.type}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"


def on_device(device: torch.device):
    """A context in which `device` is the current CUDA device: Triton launches on the current
    device, so kernels on tensors of another GPU need it (multi-GPU callers). No guard when it
    already is current, or for CPU tensors (host time on every call)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def device_reasons(device: torch.device) -> dict[str, str | None]:
    """The device-level checks for every backend; ops add their own reasons on top."""
    return {"cuda": cuda_reason(device), "triton": triton_reason(device), "torch": None}


def choose(
    op: str,
    backend: str | None,
    reasons: Mapping[str, str | None],
    auto_order: Sequence[str],
) -> str:
    """Picks the backend for one call. `reasons` maps each backend to None when it can serve
    this call, else to the reason it cannot; `auto_order` is the op's preference for this
    call (fastest first, from measurements)."""
    want = requested(backend)
    if want != "auto":
        reason = reasons.get(want, f"{op} has no {want} implementation")
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {want!r} cannot serve this call: {reason}")
        return want
    for name in auto_order:
        if reasons.get(name, "missing") is None:
            return name
    return "torch"


# op name -> fn(device) -> {backend: reason or None} for a typical call on that device
_AVAILABILITY: dict[str, Callable[[torch.device], dict[str, str | None]]] = {}


def register_op(op: str, availability: Callable[[torch.device], dict[str, str | None]]) -> None:
    _AVAILABILITY[op] = availability


def availability(device: torch.device) -> dict[str, dict[str, str | None]]:
    """For `python -m deepkern.info`: per op, per backend, None or why it cannot serve."""
    return {op: fn(device) for op, fn in sorted(_AVAILABILITY.items())}
