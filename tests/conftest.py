"""Test setup.

- Without a CUDA GPU, Triton kernels run in the Triton interpreter on CPU tensors
  (TRITON_INTERPRET=1 must be set before any @triton.jit function is defined, so it is set
  here, before deepkern is imported).
- `@pytest.mark.cuda` tests are skipped without a GPU. The GPU is queried only here, never
  when deepkern is imported.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """Every torch.empty (Python or C++, any device) comes back NaN-filled (integers: their
    max value), so an output element a kernel forgets to write fails the comparison."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


# Devices on which the kernel backends run: CPU through the Triton interpreter (CPU-only
# machines), CUDA on a GPU machine. Use as @pytest.mark.parametrize("device", KERNEL_DEVICES).
KERNEL_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernel tests need TRITON_INTERPRET=1"),
        id="cpu-interp",
    ),
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
]

# For tests whose point is the interpreter itself (Triton kernels on CPU tensors).
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING,
    reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (CPU-only machines)",
)
