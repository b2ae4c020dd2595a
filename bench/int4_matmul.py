"""Bench cases for deepkern.int4_matmul (W4A16, g=128, asymmetric), the issue's H100 shapes.

Providers, all on the same weight (seeded): ours (CUDA, Triton) in fp16 and
bf16; the Triton dequantization kernel + cuBLAS per call ("deepkern-dequant-cublas", a
candidate path for large M); cuBLAS fp16 and bf16 (F.linear on the dequantized dense weight,
so outputs cross-check to rounding); PyTorch's tinygemm (aten._weight_int4pack_mm, bf16) on
the same codes, repacked. Baseline: cuBLAS fp16. Bytes = the int4 weight streamed (packed + scales + zeros) + x + y, so the
fraction of copy bandwidth is the weight-streaming efficiency; flops = 2*M*N*K.

Every provider is timed as a CUDA-graph replay (harness.time_graph_ms), L2 cleared before
each: the kernels' GPU time. Eager calls at small M measure the host instead (on the H100
machine ~20 us of CPU per F.linear, ~50 us per CUDA op call, ~120 us per Triton op call,
against 10-60 us of GPU time), and decode loops run under CUDA graphs anyway.

Tuning (GPU): `python -m deepkern.bench.int4_matmul --sweep [--quick]` times candidate configs
per shape through triton_kernels.int4_matmul.config_override and prints the best per M.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import deepkern
from deepkern.bench.harness import Case, Skip, time_graph_ms
from deepkern.ops.int4_matmul import _reasons
from deepkern.quant import quantize_int4, unpack_int4

SHAPES = [(4096, 4096), (4096, 14336), (8192, 8192), (8192, 28672), (14336, 4096)]  # (K, N)
MS = [1, 16, 64, 128, 1024, 4096]
QUICK_SHAPES = [(8192, 8192)]
QUICK_MS = [1, 16, 128, 1024]
GROUP = 128
SEED = 1234

_cache: dict = {}


def _data(m: int, n: int, k: int):
    """x (fp16) and the Int4Weight for a case; one case is kept at a time (the weights are
    large) and rebuilt identically from SEED, so every provider sees the same numbers."""
    key = (m, n, k)
    if _cache.get("key") != key:
        _cache.clear()
        torch.manual_seed(SEED)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02, GROUP)
        _cache.update(key=key, x=x, w=w)
    return _cache["x"], _cache["w"]


def _ours(dtype, backend="triton"):
    def make(m, n, k):
        x, w = _data(m, n, k)
        x = x.to(dtype)
        reason = _reasons(x.device, dtype, m, k, GROUP)[backend]
        if reason:
            raise Skip(reason)
        return lambda: deepkern.int4_matmul(x, w, backend=backend)

    return make


def _cublas(dtype):
    def make(m, n, k):
        x, w = _data(m, n, k)
        x, dense = x.to(dtype), w.dequantize(dtype)
        return lambda: F.linear(x, dense)

    return make


def _dequant_cublas(m, n, k):
    """Triton dequantization into a dense temporary, then cuBLAS: the path a large M could
    take (measured here before `auto` uses it)."""
    from deepkern.triton_kernels.int4_matmul import int4_dequantize

    x, w = _data(m, n, k)
    return lambda: F.linear(x, int4_dequantize(w.packed, w.scales, w.zeros, w.group_len, k, x.dtype))


def _tinygemm(m, n, k):
    """tinygemm dequantizes (q - 8) * scale + zero; ours is (q - z) * scale, so its zero is
    (8 - z) * scale (rounded to bf16). Its packer takes uint8 [N, K/2], even k in the high
    nibble."""
    x, w = _data(m, n, k)
    try:
        pack = torch.ops.aten._convert_weight_to_int4pack
        mm = torch.ops.aten._weight_int4pack_mm
        q = unpack_int4(w.packed, k).to(torch.int32)
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = pack(u8, 8)
        s = w.scales.float()
        z = (8.0 - w.zeros.float()) * s
        scale_zero = torch.stack([s, z], dim=2).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
        xb = x.to(torch.bfloat16)
        mm(xb[:1], packed, GROUP, scale_zero)
    except Exception as exc:  # op missing, or its layout/signature changed in this torch
        raise Skip(f"tinygemm unavailable in torch {torch.__version__}: {type(exc).__name__}: {exc}"[:300]) from exc
    return lambda: mm(xb, packed, GROUP, scale_zero)


PROVIDERS = {
    "cublas-fp16": _cublas(torch.float16),
    "deepkern-cuda": _ours(torch.float16, "cuda"),
    "deepkern-cuda-bf16": _ours(torch.bfloat16, "cuda"),
    "deepkern-triton": _ours(torch.float16),
    "deepkern-triton-bf16": _ours(torch.bfloat16),
    "deepkern-dequant-cublas": _dequant_cublas,
    "cublas-bf16": _cublas(torch.bfloat16),
    "tinygemm-bf16": _tinygemm,
}


def _factory(make, m, n, k):
    return lambda: make(m, n, k)


def cases(quick: bool) -> list[Case]:
    out = []
    for k, n in QUICK_SHAPES if quick else SHAPES:
        for m in QUICK_MS if quick else MS:
            weight = n * (k // 8) * 4 + (k // GROUP) * n * 3  # packed + fp16 scales + u8 zeros
            out.append(Case(
                op="int4_matmul", mode="fwd", shape={"M": m, "N": n, "K": k}, dtype="fp16",
                baseline="cublas-fp16",
                providers={name: _factory(make, m, n, k) for name, make in PROVIDERS.items()},
                bytes=weight + 2 * m * k + 2 * m * n, flops=2 * m * n * k,
                note=f"g={GROUP} asymmetric", graph=True,
            ))
    return out


def smoke() -> list[str]:
    """CPU correctness of each backend that runs here (Triton in the interpreter), both
    kernel paths, against the fp64 reference on the dequantized weight."""
    from deepkern.triton_kernels.int4_matmul import Config, config_override

    lines = []
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(40, 256) * 0.05, 64)
    b = torch.randn(40).half()
    for m, config in ((1, Config("gemv", 1, 16, 64)), (5, Config("dot", 16, 32, 64))):
        x = torch.randn(m, 256).half().requires_grad_(True)
        ref = x.detach().double() @ w.dequantize(torch.float16).double().T + b.double()
        for backend in ("torch", "triton", "cuda"):
            try:
                with config_override(config):
                    y = deepkern.int4_matmul(x, w, b, backend=backend)
            except deepkern.BackendUnavailableError as exc:
                lines.append(f"skip {backend}: {exc}")
                continue
            err = ((y.double() - ref).norm() / ref.norm()).item()
            x.grad = None
            y.float().sum().backward()
            gref = torch.ones(m, 40, dtype=torch.float64) @ w.dequantize(torch.float16).double()
            gerr = ((x.grad.double() - gref).norm() / gref.norm()).item()
            ok = err < 1e-3 and gerr < 1e-3
            lines.append(f"{'ok  ' if ok else 'FAIL'} {backend} M={m} ({config.kernel}): "
                         f"fwd rel err {err:.1e}, dx rel err {gerr:.1e}")
    return lines


# ------------------------------------------------------------------------------------------
# Config sweep (GPU): which table row to write for each M bucket


def _candidates(m: int):
    from deepkern.triton_kernels.int4_matmul import Config

    if m == 1:
        return [Config("gemv", 1, bn, bk, 0, num_warps=nw, num_stages=1, waves=wv, prefetch=pf)
                for bn in (8, 16, 32) for bk in (512, 1024, 2048) for nw in (4, 8) for wv in (1, 2, 4)
                for pf in (False, True) if bn * bk <= 32768]
    if m <= 16:
        swapped = [Config("dot", 16, bn, bk, 0, num_warps=nw, num_stages=ns, waves=wv, swap=True)
                   for bn in (64, 128) for bk in (64, 128, 256) for ns in (3, 4, 5) for wv in (2, 4, 8)
                   for nw in (4, 8) if nw == 4 or bn == 128]
        plain = [Config("dot", 16, bn, bk, 0, num_warps=4, num_stages=ns, waves=2)
                 for bn in (32, 64) for bk in (128, 256) for ns in (3, 5)]
        return swapped + plain
    if m <= 256:
        bms = (64,) if m <= 64 else (128,)
        return [Config("dot", bm, bn, bk, 0, num_warps=nw, num_stages=ns, waves=wv, swap=sw)
                for sw in (True, False) for bm in bms for bn in (64, 128) for bk in (64, 128)
                for ns in (3, 4) for nw in (4, 8) for wv in (1, 2) if nw == 4 or bm * bn >= 8192]
    return [Config("dot", bm, bn, bk, 1, num_warps=nw, num_stages=ns, swap=sw)
            for sw in (True, False) for bm, bn in ((128, 128), (128, 256), (256, 128), (64, 256))
            for bk in (64, 128) for nw in (4, 8) for ns in (3, 4)
            if bm * bn * bk <= 128 * 256 * 64 and (nw == 8 or bm * bn <= 16384)]


def sweep(quick: bool, only_m: list[int] | None, shapes: list[tuple[int, int]] | None = None) -> None:
    """Prints, per shape and M, cuBLAS fp16 and the three fastest candidate configs."""
    from deepkern.triton_kernels.int4_matmul import config_override

    for k, n in shapes or (QUICK_SHAPES if quick else SHAPES):
        for m in only_m or (QUICK_MS if quick else MS):
            x, w = _data(m, n, k)
            dense = w.dequantize(torch.float16)
            base = time_graph_ms(lambda: F.linear(x, dense))
            best = []
            for config in _candidates(m):
                try:
                    with config_override(config):
                        ms = time_graph_ms(lambda: deepkern.int4_matmul(x, w, backend="triton"), rep_ms=30)
                except Exception as exc:  # e.g. out of shared memory for this tile
                    print(f"  skip {config}: {type(exc).__name__}", flush=True)
                    continue
                best.append((ms, config))
            best.sort(key=lambda t: t[0])
            print(f"M={m} N={n} K={k}: cuBLAS fp16 {base * 1e3:.1f} us", flush=True)
            for ms, config in best[:3]:
                print(f"  {ms * 1e3:8.1f} us  {base / ms:5.2f}x  {config}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m deepkern.bench.int4_matmul")
    parser.add_argument("--sweep", action="store_true", help="time candidate configs (GPU)")
    parser.add_argument("--quick", action="store_true", help="the quick shape only")
    parser.add_argument("--m", type=int, action="append", help="only this M (repeatable)")
    parser.add_argument("--shape", action="append", metavar="K,N", help="only this (K, N) (repeatable)")
    args = parser.parse_args()
    if args.sweep:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else None
        sweep(args.quick, args.m, shapes)
    else:
        print("\n".join(smoke()))
