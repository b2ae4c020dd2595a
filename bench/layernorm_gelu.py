"""Bench cases for deepkern.layernorm_gelu (bf16, H100 shapes of the issue).

Providers: ours per backend, eager F.gelu(F.layer_norm(...)), torch.compile of the same
(fresh compile per shape), Liger's LayerNorm followed by F.gelu when liger-kernel is installed.
Bytes: forward = read x + write y; forward+backward adds read x, dy + write dx.
Every provider is timed as a CUDA-graph replay (harness.time_graph_ms), the forward+backward
through autograd.grad captured whole, so the numbers are GPU time: the host time of an eager
forward+backward through autograd on the H100 bench machine (~250-300 us CUDA, ~600-800 us
Triton) is close to its GPU time at the small shapes (Triton fwd+bwd at 65536x1024: 318 us
eager, 260 us replayed; the other rows moved by less than 2%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import deepkern
from deepkern.bench.harness import Case, Skip

SHAPES = [(16384, 8192), (32768, 5120), (8192, 12288), (65536, 1024), (4096, 65536)]
QUICK = [(16384, 8192), (4096, 65536)]
EPS = 1e-5


def _eager(x, w, b):
    return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, EPS))


def _ours(backend):
    def f(x, w, b):
        return deepkern.layernorm_gelu(x, w, b, EPS, backend=backend)

    return f


def _liger():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError as exc:
        raise Skip(f"liger-kernel not installed ({exc})") from exc

    def f(x, w, b):
        return F.gelu(LigerLayerNormFunction.apply(x, w, b, EPS))

    return f


def _compiled():
    torch._dynamo.reset()  # a fresh compile for every shape; stays clear of the recompile limit
    return torch.compile(_eager, fullgraph=True)


def _inputs(rows, n, dtype, grad):
    x = torch.randn(rows, n, device="cuda", dtype=dtype) * 2 + 0.5
    w = (torch.rand(n, device="cuda", dtype=dtype) + 0.5)
    b = torch.randn(n, device="cuda", dtype=dtype) * 0.5
    if grad:
        for t in (x, w, b):
            t.requires_grad_(True)
    return x, w, b


def _provider(make_fn, rows, n, dtype, backward):
    def factory():
        fn = make_fn()
        torch.manual_seed(0)  # every provider of a case sees the same data (outputs cross-checked)
        x, w, b = _inputs(rows, n, dtype, backward)
        if not backward:
            return lambda: fn(x, w, b)
        dy = torch.randn(rows, n, device="cuda", dtype=dtype)
        # autograd.grad, not .backward(): no accumulation into .grad (an extra pass over x)
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

    return factory


def _backend_available(backend):
    def make():
        probe = torch.zeros(1, 8, device="cuda")
        try:
            deepkern.layernorm_gelu(probe, backend=backend)
        except deepkern.BackendUnavailableError as exc:
            raise Skip(str(exc)) from exc
        return _ours(backend)

    return make


def cases(quick: bool) -> list[Case]:
    out = []
    dtype = torch.bfloat16
    for mode in ("fwd", "fwd+bwd"):
        backward = mode == "fwd+bwd"
        for rows, n in QUICK if quick else SHAPES:
            elems = rows * n * dtype.itemsize
            providers = {
                "eager": _provider(lambda: _eager, rows, n, dtype, backward),
                "deepkern-cuda": _provider(_backend_available("cuda"), rows, n, dtype, backward),
                "deepkern-triton": _provider(_backend_available("triton"), rows, n, dtype, backward),
                # Training under "auto": the faster forward with the faster backward, which
                # may come from different backends.
                **({"deepkern-auto": _provider(lambda: _ours("auto"), rows, n, dtype, backward)}
                   if backward else {}),
                "torch.compile": _provider(_compiled, rows, n, dtype, backward),
                "liger+gelu": _provider(_liger, rows, n, dtype, backward),
            }
            out.append(Case(
                op="layernorm_gelu", mode=mode, shape={"rows": rows, "hidden": n},
                dtype="bf16", baseline="eager", providers=providers,
                bytes=(5 if backward else 2) * elems, graph=True,
            ))
    return out


def smoke() -> list[str]:
    """CPU correctness check of every backend that can run here, against the fp64 reference."""
    from deepkern.reference import layernorm_gelu_ref

    lines = []
    x = torch.randn(6, 300) * 2 + 0.5
    w, b = torch.rand(300) + 0.5, torch.randn(300)
    ref = layernorm_gelu_ref(x.double(), w.double(), b.double())
    for backend in ("torch", "triton", "cuda"):
        try:
            xg = x.clone().requires_grad_(True)
            y = deepkern.layernorm_gelu(xg, w, b, backend=backend)
        except deepkern.BackendUnavailableError as exc:
            lines.append(f"skip {backend}: {exc}")
            continue
        err = ((y.double() - ref).norm() / ref.norm()).item()
        y.sum().backward()
        xr = x.double().requires_grad_(True)
        layernorm_gelu_ref(xr, w.double(), b.double()).sum().backward()
        gerr = ((xg.grad.double() - xr.grad).norm() / xr.grad.norm()).item()
        ok = err < 1e-5 and gerr < 2e-5
        lines.append(f"{'ok  ' if ok else 'FAIL'} {backend}: fwd rel err {err:.1e}, dx rel err {gerr:.1e}")
    return lines
