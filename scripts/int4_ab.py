"""A/B of the CUDA int4_matmul kernels under environment overrides, on the bench's shapes.

Each variant runs in its own process (some overrides are read once per process), in
interleaved rounds; the table shows each variant's lower median (us, CUDA-graph replay after
the L2 clear, as the bench times) and every output is checked against x @ W.T in fp32 first.

    python scripts/int4_ab.py --var DEEPKERN_INT4_TILE=2 --var DEEPKERN_INT4_TILE=3 --m 33,64,128
    python scripts/int4_ab.py --var DEEPKERN_INT4_SPLITS=1 --var "" --m 64,128   # "" = defaults
    python scripts/int4_ab.py --var A=1,B=2 --var A=0 --shapes 8192x8192 --dtype bfloat16

GPU only. Shapes are (K, N) as in the bench; g=128 asymmetric weights, fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = "4096x4096,4096x14336,8192x8192,8192x28672,14336x4096"


def worker(args) -> None:
    import torch

    import deepkern
    from deepkern.bench.harness import time_graph_ms
    from deepkern.quant import quantize_int4

    dtype = getattr(torch, args.dtype)
    res = {}
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02, args.group)
        dense = w.dequantize(dtype).float()
        for m in map(int, args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ dense.T
            y = deepkern.int4_matmul(x, w, backend="cuda")
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            if not err < 1e-2:
                raise SystemExit(f"{shape} M={m}: relative error {err:.2e}")
            fn = lambda: deepkern.int4_matmul(x, w, backend="cuda")  # noqa: E731
            res[f"{shape} M={m}"] = time_graph_ms(fn, rep_ms=args.rep_ms) * 1e3
    with open(args.out, "w") as f:
        json.dump(res, f)


def parse_env(spec: str) -> dict:
    return dict(kv.split("=", 1) for kv in spec.split(",") if kv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--var", action="append", required=True, help="NAME=VALUE[,NAME=VALUE]; '' = defaults")
    p.add_argument("--m", default="64,128,256,1024")
    p.add_argument("--shapes", default=SHAPES, help="K x N, comma-separated")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rep-ms", type=int, default=40)
    p.add_argument("--worker-out", dest="out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.out:
        worker(args)
        return
    times: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for i, spec in enumerate(args.var):
                out = os.path.join(tmp, f"{rnd}_{i}.json")
                cmd = [sys.executable, __file__, "--worker-out", out, "--var", spec, "--m", args.m,
                       "--shapes", args.shapes, "--dtype", args.dtype, "--group", str(args.group),
                       "--rep-ms", str(args.rep_ms)]
                subprocess.run(cmd, check=True, env={**os.environ, **parse_env(spec)})
                with open(out) as f:
                    for case, t in json.load(f).items():
                        best = times.setdefault(case, {})
                        best[i] = min(best.get(i, float("inf")), t)
    names = [spec or "defaults" for spec in args.var]
    width = max(12, *(len(n) + 2 for n in names))
    print("case".ljust(24) + "".join(n.rjust(width) for n in names))
    for case, best in times.items():
        print(case.ljust(24) + "".join(f"{best[i]:{width}.1f}" for i in range(len(names))))


if __name__ == "__main__":
    main()
