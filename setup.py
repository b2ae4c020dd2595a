"""Build script for deepkern.

Python packages come from three folders (package_dir mapping), so a plain `pip install .`
carries all of them:
    python/deepkern   -> deepkern
    triton_kernels/   -> deepkern.triton_kernels   (never a top-level `triton_kernels`:
                                                    Triton ships a package of that name)
    bench/            -> deepkern.bench

The CUDA extension `deepkern._C` (csrc/) is compiled whenever torch is a CUDA build and a CUDA
toolkit (nvcc) is found; no GPU is needed to compile. Environment:
    DEEPKERN_BUILD_CUDA=0|1   force the extension off / on (on without nvcc is an error)
    TORCH_CUDA_ARCH_LIST      e.g. "9.0" or "8.0;9.0"; default: the local GPUs, else "8.0;9.0".
                              9.0 is compiled as sm_90a so Hopper-only code (wgmma) can be used.
    MAX_JOBS                  parallel compile jobs (ninja)
    CUDA_HOME                 toolkit root; found from nvcc / /usr/local/cuda when unset
Build with `pip install --no-build-isolation .` so the extension links against the torch that
is installed.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "8.0;9.0"


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"deepkern setup: {name}={os.environ[name]!r}; expected 0 or 1")


def _find_cuda_home():
    """The CUDA toolkit root, or None. Resolves wrapper scripts: a `nvcc` on PATH may be a
    shell script that execs the real one, so its folder is not always the toolkit root."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            return home if (Path(home) / "bin" / "nvcc").exists() else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def _parse_arch_list(text):
    archs = [a for a in re.split(r"[;\s,]+", text.strip()) if a]
    for arch in archs:
        if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch):
            sys.exit(f"deepkern setup: TORCH_CUDA_ARCH_LIST entry {arch!r} is not like '9.0' or '8.0+PTX'")
    return archs


def _arch_list(torch):
    text = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not text or text == "native":
        caps = set()
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        text = ";".join(f"{a}.{b}" for a, b in sorted(caps)) or DEFAULT_ARCHS
    archs = _parse_arch_list(text)
    # 9.0 builds as 9.0a: the same chips (H100/H200), plus wgmma/setmaxnreg. sm_90a code only
    # runs on compute capability 9.0, which is what the 9.0 target means anyway.
    archs = [re.sub(r"^9\.0(?!a)", "9.0a", a) for a in archs]
    return list(dict.fromkeys(archs))


def _cuda_extension():
    """Returns (ext_modules, cmdclass, status); the lists are empty when the extension is not
    built, and status says why (recorded in deepkern/_version.py for the build test)."""
    force = _env_flag("DEEPKERN_BUILD_CUDA")
    if force is False:
        print("deepkern setup: DEEPKERN_BUILD_CUDA=0, building without the CUDA extension")
        return [], {}, "disabled: DEEPKERN_BUILD_CUDA=0"
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        if force:
            sys.exit(
                "deepkern setup: DEEPKERN_BUILD_CUDA=1 but torch is not importable in the build "
                f"environment ({exc}). Install torch first, then build with "
                "`pip install --no-build-isolation .`"
            )
        print("deepkern setup: torch not importable at build time; skipping the CUDA extension")
        return [], {}, "skipped: torch not importable at build time"

    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    if problems:
        if force:
            sys.exit("deepkern setup: DEEPKERN_BUILD_CUDA=1 but " + "; ".join(problems))
        print("deepkern setup: skipping the CUDA extension: " + "; ".join(problems))
        return [], {}, "skipped: " + "; ".join(problems)

    archs = _arch_list(torch)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    arch_tag = "_".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)
    sources = ["csrc/registration.cpp"]
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    sources += sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "csrc").rglob("*.cpp")
        if p.name != "registration.cpp"
    )
    defines = [f"-DDEEPKERN_ARCHS={arch_tag}", f"-DDEEPKERN_TORCH_VERSION={torch.__version__.split('+')[0]}"]
    if any(a.startswith("9.0a") for a in archs):
        defines.append("-DDEEPKERN_HAS_SM90A=1")
    cxx = ["-O3", "-std=c++20"] + defines
    nvcc = [
        "-O3",
        "-std=c++20",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        # torch's defaults hide the half/bf16 operators; the kernels use them.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
    ] + defines
    if _env_flag("DEEPKERN_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    print(f"deepkern setup: building deepkern._C for {';'.join(archs)} with CUDA_HOME={cuda_home}")
    ext = CUDAExtension(
        name="deepkern._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, "built"


def _write_version_file(cuda_build):
    """Records the git commit (for the bench's JSON when git is unavailable) and whether the
    CUDA extension was built (for tests/test_build.py)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    (ROOT / "python" / "deepkern" / "_version.py").write_text(
        "# written by setup.py at build time\n"
        f"build_commit = {commit!r}\n"
        f"cuda_build = {cuda_build!r}\n"
    )


ext_modules, cmdclass, cuda_build = _cuda_extension()
_write_version_file(cuda_build)

setup(
    package_dir={
        "deepkern": "python/deepkern",
        "deepkern.triton_kernels": "triton_kernels",
        "deepkern.bench": "bench",
    },
    packages=["deepkern", "deepkern.triton_kernels", "deepkern.bench"]
    + ["deepkern." + p for p in find_packages(str(ROOT / "python" / "deepkern"))],
    package_data={"deepkern.bench": ["results/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
