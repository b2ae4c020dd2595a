"""Benchmark harness: ceilings, timing, table, JSON and plots. Ops plug in through modules
named in OPS, each with `cases(quick) -> list[Case]` and `smoke() -> list[str]`.

Every number is a median of triton.testing.do_bench (which clears L2 before each run) on
random data; cases marked `graph=True` time a CUDA-graph replay of each provider instead of
the eager call (see time_graph_ms). Ceilings (device copy bandwidth, bf16 matmul rate) are
measured in the same run, and each row's speedup is against its case's baseline provider
measured side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

OPS = {
    "layernorm_gelu": "deepkern.bench.layernorm_gelu",
    "int4_matmul": "deepkern.bench.int4_matmul",
    "sparse_attention": "deepkern.bench.sparse_attention",
}


class Skip(Exception):
    """Raised by a provider factory that cannot run here (missing package, backend, ...)."""


@dataclasses.dataclass
class Case:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: dict  # e.g. {"rows": 16384, "hidden": 8192}
    dtype: str
    baseline: str  # provider whose time the speedups divide
    providers: dict[str, Callable[[], Callable[[], Any]]]  # name -> factory -> timed fn
    bytes: int | None = None  # minimal bytes moved (memory-bound cases)
    flops: int | None = None  # useful FLOPs (compute-bound cases)
    note: str = ""
    graph: bool = False  # time every provider as a CUDA-graph replay (time_graph_ms)

    @property
    def label(self) -> str:
        return "x".join(str(v) for v in self.shape.values())


# ------------------------------------------------------------------------------------------
# Environment


def git_commit() -> str:
    """The commit of the source tree deepkern runs from (editable installs), else the commit
    recorded at build time; '+dirty' when the tree has uncommitted changes."""
    import deepkern

    src = Path(deepkern.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        from deepkern._version import build_commit

        return build_commit
    except ImportError:
        return "unknown"


def environment() -> dict:
    import deepkern

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "deepkern": deepkern.__version__,
        "commit": os.environ.get("DEEPKERN_COMMIT") or git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


# ------------------------------------------------------------------------------------------
# Timing


def time_ms(fn: Callable[[], Any], rep_ms: int = 100, rounds: int = 2) -> float:
    """Device time of fn in milliseconds (L2 cleared before each run): the lower of `rounds`
    medians. Calls whose host time is close to their GPU time (a fwd+bwd through autograd)
    read high while the host is busy (e.g. torch.compile's workers after a compile): in one
    bench run layernorm_gelu's CUDA fwd+bwd at 65536x1024 read 536 us, 267 us in a quiet
    process right after."""
    import triton.testing

    return min(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
               for _ in range(rounds))


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured in a CUDA graph (after a warm-up on a side stream, as capture requires);
    returns the replay. The graph keeps fn's output buffers, so the replay writes the same
    memory every time, as a decode step under vLLM/SGLang's graphs does."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_graph_ms(fn: Callable[[], Any], rep_ms: int = 100, rounds: int = 2) -> float:
    """time_ms of fn's CUDA-graph replay: the GPU time of the kernels fn launches, without the
    host time of the eager call. For ops whose GPU time is below their host time on the bench
    machine (int4_matmul at small M: ~20 us of host per F.linear, ~50 us per CUDA op call and
    ~120 us per Triton op call on the H100 machine's CPU, against 10-60 us of GPU time), eager
    timing measures the CPU. L2 is still cleared before each replay (the replay's host time,
    ~10 us, runs while the GPU clears L2, so the GPU never waits for it)."""
    return time_ms(graphed(fn), rep_ms=rep_ms, rounds=rounds)


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate."""
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b)
    return {"copy_gbps": round(copy_gbps, 1), "matmul_tflops": round(2 * n**3 / mm_ms / 1e9, 1)}


def _as_tuple(out) -> tuple:
    if out is None:
        return ()
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rel_err(a, b) -> float | None:
    """Largest relative error over the tensors two providers returned (None if incomparable)."""
    ta, tb = _as_tuple(a), _as_tuple(b)
    if not ta or len(ta) != len(tb):
        return None
    worst = 0.0
    for x, y in zip(ta, tb):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape:
            return None
        x, y = x.detach().double(), y.detach().double()
        den = y.norm().item()
        err = (x - y).norm().item() / (den if den > 0 else 1.0)
        worst = max(worst, err if err == err else float("inf"))
    return worst


def run_case(case: Case, ceilings: dict, env: dict, progress: Callable[[str], None]) -> list[dict]:
    rows = []
    baseline_out = None
    results = {}
    names = [case.baseline] + [p for p in case.providers if p != case.baseline]
    for name in names:
        progress(f"{case.op} {case.mode} {case.label} {case.dtype}: {name}")
        row = {
            "op": case.op, "mode": case.mode, "shape": case.shape, "label": case.label,
            "dtype": case.dtype, "provider": name, "baseline": case.baseline,
            "timing": "cuda-graph" if case.graph else "eager",
        }
        try:
            fn = case.providers[name]()
            out = fn()  # warm-up (compiles), and the output for the cross-check
            torch.cuda.synchronize()
            ms = time_graph_ms(fn) if case.graph else time_ms(fn)
        except Skip as exc:
            row.update(status="skipped", reason=str(exc))
            rows.append(row)
            continue
        except Exception as exc:  # a provider failing must not end the sweep
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
            continue
        if name == case.baseline:
            baseline_out = out
        err = rel_err(out, baseline_out) if baseline_out is not None else None
        del out
        row.update(status="ok", time_us=round(ms * 1e3, 2), rel_err_vs_baseline=err)
        if case.bytes:
            gbps = case.bytes / ms / 1e6
            row.update(bytes=case.bytes, gbps=round(gbps, 1),
                       frac_copy=round(gbps / ceilings["copy_gbps"], 3),
                       floor_us=round(case.bytes / ceilings["copy_gbps"] / 1e3, 2))
        if case.flops:
            tflops = case.flops / ms / 1e9
            row.update(flops=case.flops, tflops=round(tflops, 1),
                       frac_matmul=round(tflops / ceilings["matmul_tflops"], 3))
        results[name] = ms
        rows.append(row)
    base = results.get(case.baseline)
    for row in rows:
        if row.get("status") == "ok" and base:
            row["speedup"] = round(base / (row["time_us"] / 1e3), 3)
        row.update(gpu=env["gpu"], torch=env["torch"], triton=env["triton"], commit=env["commit"])
    return rows


# ------------------------------------------------------------------------------------------
# Output


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<16}{'mode':<9}{'shape':<16}{'dtype':<10}{'provider':<22}{'time us':>10}" \
           f"{'rate':>14}{'of ceil':>9}{'speedup':>9}{'err':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['op']:<16}{r['mode']:<9}{r['label']:<16}{r['dtype']:<10}"
                         f"{r['provider']:<22}  {r.get('status')}: {r.get('reason', '')[:70]}")
            continue
        if "gbps" in r:
            rate, frac = f"{r['gbps']:.0f} GB/s", r["frac_copy"]
        elif "tflops" in r:
            rate, frac = f"{r['tflops']:.0f} TFLOP/s", r["frac_matmul"]
        else:
            rate, frac = "", None
        err = r.get("rel_err_vs_baseline")
        lines.append(
            f"{r['op']:<16}{r['mode']:<9}{r['label']:<16}{r['dtype']:<10}{r['provider']:<22}"
            f"{r['time_us']:>10.1f}{rate:>14}{(f'{frac:.0%}' if frac is not None else ''):>9}"
            f"{(str(r['speedup']) + 'x') if 'speedup' in r else '':>9}"
            f"{(f'{err:.1e}' if err is not None else ''):>10}"
        )
    return "\n".join(lines)


def write_plots(rows: list[dict], outdir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); pip install matplotlib") from exc
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    for (op, mode, dtype), rs in groups.items():
        labels = list(dict.fromkeys(r["label"] for r in rs))
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = []
            for lab in labels:
                match = [r for r in rs if r["provider"] == p and r["label"] == lab]
                vals.append(match[0].get("speedup", 0) if match else 0)
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20)
        ax.set_ylabel(f"speedup vs {rs[0]['baseline']}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{op} {mode} {dtype} ({rs[0]['gpu']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"{op}_{mode.replace('+', '_')}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------
# Entry point


def _load(ops: list[str]):
    return {op: importlib.import_module(OPS[op]) for op in ops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepkern.bench", description="deepkern kernel microbenchmarks"
    )
    parser.add_argument("--op", choices=sorted(OPS), action="append",
                        help="benchmark only this op (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (one or two per op)")
    parser.add_argument("--json", type=Path, help="write the rows and environment as JSON here")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts here (matplotlib)")
    args = parser.parse_args(argv)
    ops = args.op or list(OPS)
    env = environment()

    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            # Triton kernels on CPU need the interpreter, and TRITON_INTERPRET is read when
            # triton is first imported (already done by `import deepkern`): start afresh.
            os.environ["TRITON_INTERPRET"] = "1"
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "deepkern.bench", *sys.argv[1:]])
        print("No CUDA GPU: timings SKIPPED. Running a CPU correctness smoke of each op instead.")
        failures = 0
        for op, module in _load(ops).items():
            for line in module.smoke():
                print(f"  {op}: {line}")
                failures += line.startswith("FAIL")
        print(f"smoke: {'all passed' if not failures else f'{failures} FAILED'} (no timings taken)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"env": env, "timings": "skipped: no CUDA GPU"}, indent=1))
        return 1 if failures else 0

    modules = _load(ops)
    print(f"deepkern bench on {env['gpu']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit'][:12]}", flush=True)
    t0 = time.time()
    ceilings = measure_ceilings()
    env.update(ceilings)
    print(f"ceilings: device copy {ceilings['copy_gbps']:.0f} GB/s (read+write), "
          f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s", flush=True)
    cases = [c for m in modules.values() for c in m.cases(args.quick)]
    rows: list[dict] = []
    total = sum(len(c.providers) for c in cases)
    done = 0

    def progress(msg: str):
        nonlocal done
        done += 1
        print(f"[{done}/{total} {time.time() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    for case in cases:
        rows.extend(run_case(case, ceilings, env, progress))
        torch.cuda.empty_cache()
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        for path in write_plots(rows, args.plot):
            print(f"wrote {path}")
    # A peer failing (e.g. a torch.compile error) is recorded; one of ours failing fails the run.
    errors = [r for r in rows if r.get("status") == "error" and r["provider"].startswith("deepkern")]
    for r in errors:
        print(f"ERROR {r['op']} {r['label']} {r['provider']}: {r['reason']}", file=sys.stderr)
    return 1 if errors else 0
