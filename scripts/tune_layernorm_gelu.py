"""Launch-configuration sweep for layernorm_gelu on a GPU (dev tool, not part of the package).

Times the CUDA kernels under each (iters, cluster) override (DEEPKERN_LNG_FWD/BWD) and the
Triton launchers under config overrides, at the bench shapes, checking every output against
the default configuration. Prints one table per shape; writes JSON with --json.

    python scripts/tune_layernorm_gelu.py [--json PATH] [--shapes 16384x8192,...] [--defaults]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton.testing

import deepkern  # noqa: F401  (registers the ops)
from deepkern.triton_kernels import layernorm_gelu as tk

SHAPES = [(16384, 8192), (32768, 5120), (8192, 12288), (65536, 1024), (4096, 65536)]
# CUDA variants (environment overrides): forward split kernel from 1024 vectors (default),
# always, never, without clusters; backward ring kernel (default), its vectors per thread and
# cluster split, and the kernels without the ring.
FWD_ENVS = [{}, {"DEEPKERN_LNG_FWD_SPLIT": "1"}, {"DEEPKERN_LNG_FWD_SPLIT": "0"}, {"DEEPKERN_LNG_FWD_CLUSTER": "1"}]
BWD_ENVS = [{}, {"DEEPKERN_LNG_BWD_RING_ITERS": "1"}] + [
    {"DEEPKERN_LNG_BWD_RING_CLUSTER": str(c)} for c in (2, 3, 4, 8, 16)] + [{"DEEPKERN_LNG_BWD_RING": "0"}]
TRITON_FWD = [{}, {"num_warps": 4}, {"num_warps": 8}, {"num_warps": 16}, {"num_warps": 32}, {"chunk": 2048, "num_warps": 8},
              {"max_row_block": 0, "chunk": 0, "block": 4096, "num_warps": 8},
              {"max_row_block": 0, "chunk": 0, "block": 4096, "num_warps": 16}]
# {} is the default: widths that are not a power of two as two power-of-two chunks (5120 =
# 4096 + 1024, 12288 = 8192 + 4096); two_chunks=False: one padded block (12288: two kernels).
# The prefetch is on by default up to 9216 columns (off for 10240, 12288).
TRITON_BWD = [{}, {"two_chunks": False}, {"num_warps": 8}, {"num_warps": 32}, {"prefetch": False},
              {"prefetch": True}, {"num_warps": 8, "per_sm": 2}, {"num_warps": 4, "per_sm": 4},
              {"stages": 2}, {"stages": 3}, {"stages": 4}, {"stages": 3, "per_sm": 2}]
TRITON_BWD_QUICK = [{}, {"stages": 2}, {"stages": 3}, {"stages": 4}, {"stages": 3, "per_sm": 2},
                    {"stages": 3, "num_warps": 8}]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def relerr(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes")
    ap.add_argument("--cuda-only", action="store_true", help="skip the Triton sweeps")
    ap.add_argument("--triton-bwd-only", action="store_true", help="only the Triton backward sweep")
    ap.add_argument("--defaults", action="store_true",
                    help="the default configuration of each backend (and the CUDA split forward at every width)")
    args = ap.parse_args()
    global FWD_ENVS, BWD_ENVS, TRITON_FWD, TRITON_BWD
    if args.defaults:
        FWD_ENVS, BWD_ENVS, TRITON_FWD, TRITON_BWD = FWD_ENVS[:2], [{}], [{}], [{}]
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = []
    for rows, n in shapes:
        torch.manual_seed(0)
        x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) * 2 + 0.5
        w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.5
        dy = torch.randn_like(x)
        elems = rows * n * 2
        fwd_floor = 2 * elems / 3.0e12 * 1e6
        bwd_floor = 3 * elems / 3.0e12 * 1e6
        print(f"\n== {rows}x{n} bf16: floors fwd {fwd_floor:.0f} us, bwd {bwd_floor:.0f} us (at 3.0 TB/s)")
        cu = torch.ops.deepkern
        ref = tk if args.triton_bwd_only else cu  # the Triton-only sweep runs without the CUDA build
        y0, _, mean, rstd = ref.layernorm_gelu_fwd(x, w, b, None, 1e-5, False, False)
        dx0, dw0, db0 = ref.layernorm_gelu_bwd(dy, x, w, b, mean, rstd, False, False)

        def record(kind, name, us, err):
            floor = fwd_floor if kind == "fwd" else bwd_floor
            results.append(dict(shape=f"{rows}x{n}", kind=kind, provider=name, us=round(us, 1),
                                frac=round(floor / us, 3), err=err))
            flag = "" if err < 1e-2 else "  <-- WRONG"
            print(f"  {kind} {name:<28} {us:8.1f} us  {floor / us:5.0%} of copy  err {err:.1e}{flag}")

        for env in [] if args.triton_bwd_only else FWD_ENVS:
            os.environ.update(env)
            y = cu.layernorm_gelu_fwd(x, w, b, None, 1e-5, False, False)[0]
            record("fwd", f"cuda {env or 'default'}",
                   bench(lambda: cu.layernorm_gelu_fwd(x, w, b, None, 1e-5, False, False)),
                   relerr(y, y0))
            for key in env:
                os.environ.pop(key)
        for env in [] if args.triton_bwd_only else BWD_ENVS:
            os.environ.update(env)
            dx, dw, _ = cu.layernorm_gelu_bwd(dy, x, w, b, mean, rstd, False, False)
            record("bwd", f"cuda {env or 'default'}",
                   bench(lambda: cu.layernorm_gelu_bwd(dy, x, w, b, mean, rstd, False, False)),
                   max(relerr(dx, dx0), relerr(dw, dw0)))
            for key in env:
                os.environ.pop(key)
        # The GELU's share: the same kernels with the (cheaper) tanh form, and rmsnorm.
        for tanh, rms in () if args.triton_bwd_only or args.defaults else ((True, False), (False, True)):
            tag = "tanh" if tanh else "rms"
            record("fwd", f"cuda default {tag}",
                   bench(lambda: cu.layernorm_gelu_fwd(x, w, b, None, 1e-5, rms, tanh)), 0.0)
            record("fwd", f"triton default {tag}",
                   bench(lambda: tk.layernorm_gelu_fwd(x, w, b, None, 1e-5, rms, tanh)), 0.0)
        scratch = torch.empty_like(x)
        record("fwd", "torch copy_ (x -> y)", bench(lambda: scratch.copy_(x)), 0.0)
        del scratch

        for cfg in [] if args.cuda_only or args.triton_bwd_only else TRITON_FWD:
            try:
                y = tk.layernorm_gelu_fwd(x, w, b, None, 1e-5, False, False, cfg)[0]
                torch.cuda.synchronize()
                record("fwd", f"triton {cfg}",
                       bench(lambda: tk.layernorm_gelu_fwd(x, w, b, None, 1e-5, False, False, cfg)),
                       relerr(y, y0))
            except Exception as exc:  # noqa: BLE001
                print(f"  triton fwd {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
        for cfg in [] if args.cuda_only else TRITON_BWD_QUICK if args.triton_bwd_only else TRITON_BWD:
            try:
                dx, dw, _ = tk.layernorm_gelu_bwd(dy, x, w, b, mean, rstd, False, False, cfg)
                record("bwd", f"triton {cfg}",
                       bench(lambda: tk.layernorm_gelu_bwd(dy, x, w, b, mean, rstd, False, False, cfg)),
                       max(relerr(dx, dx0), relerr(dw, dw0)))
            except Exception as exc:  # noqa: BLE001
                print(f"  triton bwd {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
        del x, dy
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
