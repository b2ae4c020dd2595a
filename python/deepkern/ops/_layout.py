"""Layout helpers shared by the ops."""

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, last] view with unit last stride and one row stride, so kernels can take
    (pointer, row stride). Copies only when the layout has no such view (e.g. a transposed or
    expanded tensor)."""
    n = t.shape[-1]
    if t.stride(-1) == 1:
        try:
            v = t.view(-1, n)
            if v.shape[0] <= 1 or v.stride(0) >= n:
                return v
        except RuntimeError:  # no such view of this layout
            pass
    return t.reshape(-1, n).contiguous()
