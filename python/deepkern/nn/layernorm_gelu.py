"""LayerNormGELU: nn.LayerNorm (or RMSNorm) followed by nn.GELU, as one fused module."""

from __future__ import annotations

import torch
from torch import nn

from deepkern.ops.layernorm_gelu import layernorm_gelu


class LayerNormGELU(nn.Module):
    """GELU(LayerNorm(x)) over the last dim in one pass (forward and backward).

    Parameters match nn.LayerNorm(hidden, eps, elementwise_affine=True, bias=bias): `weight`
    (ones) and `bias` (zeros, when bias=True). `norm="rmsnorm"` drops the mean subtraction.
    `forward(x, residual=None)` returns y, or (y, x + residual) when a residual is given.
    """

    def __init__(
        self,
        hidden: int,
        eps: float = 1e-5,
        approximate: str = "none",
        bias: bool = True,
        norm: str = "layernorm",
        device=None,
        dtype=None,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"LayerNormGELU: hidden must be a positive int, got {hidden!r}")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"LayerNormGELU: approximate={approximate!r}: expected 'none' or 'tanh'")
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"LayerNormGELU: norm={norm!r}: expected 'layernorm' or 'rmsnorm'")
        if not eps > 0:
            raise ValueError(f"LayerNormGELU: eps must be > 0, got {eps!r}")
        self.hidden = hidden
        self.eps = float(eps)
        self.approximate = approximate
        self.norm = norm
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(hidden, **factory))
        self.bias = nn.Parameter(torch.zeros(hidden, **factory)) if bias else None

    @classmethod
    def from_modules(cls, layernorm: nn.Module, gelu: nn.GELU, backend: str | None = None):
        """Builds the fused module from an nn.LayerNorm (or nn.RMSNorm) and an nn.GELU,
        sharing their parameters (no copy)."""
        if not isinstance(gelu, nn.GELU):
            raise TypeError(f"from_modules: expected nn.GELU, got {type(gelu).__name__}")
        rms_cls = getattr(nn, "RMSNorm", None)
        if isinstance(layernorm, nn.LayerNorm):
            norm = "layernorm"
        elif rms_cls is not None and isinstance(layernorm, rms_cls):
            norm = "rmsnorm"
        else:
            raise TypeError(f"from_modules: expected nn.LayerNorm or nn.RMSNorm, got {type(layernorm).__name__}")
        shape = tuple(layernorm.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"from_modules: only a 1-D normalized_shape is supported, got {shape}")
        if not layernorm.elementwise_affine:
            raise ValueError("from_modules: the norm must have elementwise_affine=True")
        eps = layernorm.eps
        if eps is None:  # nn.RMSNorm(eps=None) uses torch.finfo(dtype).eps
            eps = torch.finfo(layernorm.weight.dtype).eps
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.hidden = shape[0]
        fused.eps = float(eps)
        fused.approximate = gelu.approximate
        fused.norm = norm
        fused.backend = backend
        fused.weight = layernorm.weight
        fused.bias = getattr(layernorm, "bias", None)
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layernorm_gelu(
            x, self.weight, self.bias, self.eps, self.approximate, residual, self.norm, self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"{self.hidden}, eps={self.eps}, approximate={self.approximate!r}, "
            f"bias={self.bias is not None}, norm={self.norm!r}"
        )


def fuse_layernorm_gelu(model: nn.Module, backend: str | None = None) -> int:
    """Replaces, in place, every nn.LayerNorm (or nn.RMSNorm) directly followed by nn.GELU
    inside an nn.Sequential with one LayerNormGELU (the GELU slot becomes nn.Identity, so
    indices and state_dict keys stay valid). Returns how many pairs were fused."""
    rms_cls = getattr(nn, "RMSNorm", None)
    norm_types = (nn.LayerNorm,) + ((rms_cls,) if rms_cls is not None else ())
    fused = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules.keys())
        for first, second in zip(names, names[1:]):
            a, b = module._modules[first], module._modules[second]
            if (
                isinstance(a, norm_types)
                and isinstance(b, nn.GELU)
                and len(a.normalized_shape) == 1
                and a.elementwise_affine
            ):
                module._modules[first] = LayerNormGELU.from_modules(a, b, backend=backend)
                module._modules[second] = nn.Identity()
                fused += 1
    return fused
