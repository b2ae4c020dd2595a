"""Triton launches with less host time.

`kernel[grid](*args, **constexprs)` costs ~57 us of CPU per launch on the GPU machine's host
(Triton 3.6, a 21-parameter kernel; .dev-style probe at 64x1024 so the GPU idles): argument
binding, specialization, cache-key strings and launch metadata, all in Python. The eager
layernorm_gelu forward+backward launches three kernels, and its host time (~660-800 us) was
above its GPU time (~590 us at 16384x8192).

`launch(kernel, grid, args, constexprs, **options)` keeps its own cache of compiled kernels,
keyed on everything Triton specializes a launch on (tensor dtype and 16-byte alignment; for
ints: equal to 1, divisible by 16, 32- or 64-bit range; floats are not specialized; the
constexpr values and launch options; the device). A miss goes through `kernel[grid](...)`,
which compiles or finds the kernel and launches it, and whose result is cached; a hit calls the
compiled kernel's launcher directly, with the arguments Triton's own `run` would pass.

Used only where that is known to be what Triton does: the installed `JITFunction.run` must
launch through `kernel.run(grid_0, grid_1, grid_2, stream, kernel.function,
kernel.packed_metadata, launch_metadata, ...)` (checked once, on its source), no launch hooks
may be active (profilers; checked per call), and not under TRITON_INTERPRET=1. DEEPKERN_TRITON_FAST_LAUNCH=0 turns it
off. Otherwise `launch` is exactly `kernel[grid](*args, **constexprs, **options)`.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

_EXPECTED_CALL = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                  "launch_metadata,")
_I32 = (-(2**31), 2**31)
_enabled: bool | None = None
_cache: dict = {}


def _supported() -> bool:
    if os.environ.get("DEEPKERN_TRITON_FAST_LAUNCH", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    try:
        run = triton.runtime.jit.JITFunction.run
        source = " ".join(inspect.getsource(run).split())
        _get_stream = torch._C._cuda_getCurrentRawStream  # noqa: F841  (must exist)
    except (AttributeError, OSError, TypeError):
        return False
    return _EXPECTED_CALL in source


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = _supported()
    return _enabled


def _hook_active(hook) -> bool:
    # Triton >= 3.5: an always-present HookChain, active when it holds calls; before: a
    # callable or None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True  # unknown layout: take Triton's own path
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if hasattr(a, "block_shape") and isinstance(getattr(a, "base", None), torch.Tensor):
        # a TensorDescriptor: Triton specializes on its dtype and block shape (the launcher
        # encodes the tensor map from base, shape and strides at every launch)
        return "desc", a.base.dtype, tuple(a.block_shape), getattr(a, "padding", None)
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        return "i", a == 1, a % 16 == 0, _I32[0] <= a < _I32[1], a < 2**63
    if isinstance(a, float):
        return "f"
    if a is None:
        return None
    return "o", a


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
    """kernel[grid](*args, **constexprs, **options), cached (see the module docstring).
    `args` are the kernel's leading parameters in order, `constexprs` all the others by name."""
    if not enabled() or _hooks_set():
        kernel[grid](*args, **constexprs, **options)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, tuple(map(_arg_key, args)), tuple(constexprs.items()), tuple(options.items()))
    entry = _cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs, **options)
        tail = tuple(kernel.arg_names[len(args):])
        if sorted(tail) == sorted(constexprs) and hasattr(compiled, "packed_metadata"):
            _cache[key] = (compiled, tail)
        return
    compiled, tail = entry
    stream = torch._C._cuda_getCurrentRawStream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *[constexprs[name] for name in tail])
