"""Shared test helpers: relative-error checks against higher-precision references."""

import torch

# ||out - ref|| / ||ref|| bounds per output dtype (DESIGN.md).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0, what: str = "output"):
    """Relative error under the bound of `dtype` (default: out's dtype) times `scale`.
    NaN anywhere in `out` that is not NaN in `ref` fails."""
    dtype = dtype or out.dtype
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    bad_nan = torch.isnan(o) & ~torch.isnan(r)
    assert not bad_nan.any(), f"{what}: {int(bad_nan.sum())} NaN where the reference has none (unwritten output?)"
    finite = torch.isfinite(r)
    err = rel_error(o[finite], r[finite])
    bound = REL_TOL[dtype] * scale
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e} ({dtype})"
    assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN pattern differs from the reference"
