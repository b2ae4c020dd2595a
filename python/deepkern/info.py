"""`python -m deepkern.info`: versions, GPU, compiled archs, and which backend serves what."""

from __future__ import annotations

import platform
import sys

import torch

import deepkern
from deepkern import _backend, _ext


def collect() -> dict:
    info = {
        "deepkern": deepkern.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None,
        "gpu": None,
        "cuda_ext": _ext.has_cuda_ext(),
        "cuda_ext_error": _ext.cuda_ext_error(),
        "build": _ext.build_info(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info["device"] = str(device)
    info["backends"] = _backend.availability(device)
    return info


def main() -> int:
    info = collect()
    print(f"deepkern {info['deepkern']}")
    print(f"python   {info['python']}")
    print(f"torch    {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})")
    print(f"triton   {info['triton'] or 'not installed'}")
    gpu = info["gpu"]
    if gpu:
        print(f"gpu      {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
              f"{gpu['memory_gib']} GiB) x{gpu['count']}")
    else:
        print("gpu      none visible")
    if info["cuda_ext"]:
        b = info["build"]
        cuda = b.get("cuda_runtime_version", 0)
        print(f"_C       loaded; archs {b.get('archs')}, CUDA {cuda // 1000}.{cuda % 1000 // 10}, "
              f"built with torch {b.get('torch_version')}")
    else:
        print(f"_C       not loaded: {info['cuda_ext_error']}")
    print(f"\nbackends for tensors on {info['device']} (auto order is per op and shape):")
    for op, reasons in info["backends"].items():
        print(f"  {op}")
        for backend, reason in reasons.items():
            print(f"    {backend:<7} {'yes' if reason is None else 'no: ' + reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
