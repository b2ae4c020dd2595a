"""Int4Linear (a drop-in nn.Linear with a 4-bit grouped weight) and quantize_model."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys

import torch
from torch import nn

from deepkern.ops.int4_matmul import int4_matmul_parts
from deepkern.quant.int4 import (
    LAYOUT_VERSION,
    SCALE_DTYPES,
    Int4Weight,
    check_group_size,
    effective_group_size,
    quantize_int4,
)


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W [out_features, in_features] stored as 4-bit codes in groups
    of `group_size` along in_features (deepkern.quant.int4 describes the format).

    Buffers (so state_dict, load_state_dict, .to() and .cuda() work as usual): `packed`
    (int32), `scales` (`dtype`), `zeros` (uint8; absent when symmetric). `bias` is an
    nn.Parameter and can be trained; the quantized weight is frozen. The format facts
    (layout version, group size, symmetric) travel in the state dict's extra state and are
    checked on load. `weight` returns the Int4Weight view of the buffers.

    A new module holds a random weight drawn like nn.Linear's (uniform +-1/sqrt(in_features)),
    quantized; use from_linear() or load_state_dict() for real weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        symmetric: bool = False,
        dtype: torch.dtype = torch.float16,
        device=None,
        backend: str | None = None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Int4Linear: {name} must be a positive int, got {v!r}")
        check_group_size(group_size, in_features, "Int4Linear")
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"Int4Linear: dtype must be float16, bfloat16 or float32, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.backend = group_size, bool(symmetric), backend
        groups = in_features // effective_group_size(group_size, in_features)
        kw = (in_features + 7) // 8
        self.register_buffer("packed", torch.zeros(out_features, kw, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype, device=device))
        zeros = None if symmetric else torch.full((groups, out_features), 8, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        if self.packed.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        dense = torch.empty(self.out_features, self.in_features, device=self.packed.device)
        self.set_weight(dense.uniform_(-bound, bound))
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantizes a dense [out_features, in_features] weight into the buffers (in place)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"Int4Linear.set_weight: weight.shape must be ({self.out_features}, "
                f"{self.in_features}), got {tuple(weight.shape)}"
            )
        q = quantize_int4(weight.to(self.packed.device, self.scales.dtype), self.group_size, self.symmetric)
        self.packed.copy_(q.packed)
        self.scales.copy_(q.scales)
        if self.zeros is not None:
            self.zeros.copy_(q.zeros)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        symmetric: bool = False,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> "Int4Linear":
        """The quantized counterpart of `linear`, on its device; dtype (of the scales and bias,
        i.e. of the activations it expects) defaults to linear.weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int4Linear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        dtype = dtype or linear.weight.dtype
        mod = cls(
            linear.in_features, linear.out_features, linear.bias is not None, group_size,
            symmetric, dtype, device="meta", backend=backend,
        )
        q = quantize_int4(linear.weight.detach().to(dtype), group_size, symmetric)
        mod.packed, mod.scales, mod.zeros = q.packed, q.scales, q.zeros
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().to(dtype).clone(), linear.bias.requires_grad)
        return mod

    @property
    def weight(self) -> Int4Weight:
        return Int4Weight(
            self.packed, self.scales, self.zeros, self.out_features, self.in_features,
            self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul_parts(
            x, self.packed, self.scales, self.zeros, self.out_features, self.in_features,
            self.group_size, self.bias, self.backend, who="Int4Linear",
        )

    def get_extra_state(self):
        return {"layout_version": LAYOUT_VERSION, "group_size": self.group_size, "symmetric": self.symmetric}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(
                f"Int4Linear.load_state_dict: the checkpoint's format {state} differs from this "
                f"module's {mine}; build the module with the checkpoint's group_size/symmetric"
            )

    def extra_repr(self) -> str:
        g = "channelwise" if self.group_size == -1 else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {g}, symmetric={self.symmetric}, dtype={self.scales.dtype}"
        )


# ------------------------------------------------------------------------------------------
# Model conversion


@dataclasses.dataclass
class QuantizeSummary:
    """What quantize_model did: module names replaced and skipped (name -> reason), and the
    bytes of the replaced layers' weights and biases before and after."""

    replaced: list[str]
    skipped: dict[str, str]
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines = [
            f"quantize_model: {len(self.replaced)} Linear layers replaced by Int4Linear, "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({ratio:.2f}x smaller); {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _skip_reason(name: str, linear: nn.Linear, skip, group_size: int) -> str | None:
    parts = name.split(".")
    for pattern in skip:
        if fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in parts):
            return f"matches skip pattern {pattern!r}"
    if group_size != -1 and linear.in_features % group_size != 0:
        return f"in_features={linear.in_features} is not divisible by group_size={group_size}"
    w = linear.weight
    if w.device.type == "meta":
        return "weight is on the meta device"
    if w.dtype not in SCALE_DTYPES:
        return f"weight dtype {w.dtype} is not float16/bfloat16/float32"
    return None


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    group_size: int = 128,
    skip=("lm_head",),
    symmetric: bool = False,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    quiet: bool = False,
) -> QuantizeSummary:
    """Replaces every nn.Linear in `model` (in place) by Int4Linear.from_linear(...), on the
    layer's device, and returns a QuantizeSummary.

    Args:
        group_size, symmetric, dtype, backend: passed to Int4Linear.from_linear (dtype None
            keeps each layer's weight dtype).
        skip: names or fnmatch patterns; a layer is kept dense when its qualified name, or any
            dotted part of it, matches (default: the output head "lm_head").
        quiet: no progress line on stderr.
    Layers are also kept dense (and listed in the summary) when in_features is not divisible
    by group_size, and subclasses of nn.Linear are left alone (e.g. nn.MultiheadAttention's
    out_proj, whose weight the parent reads directly). A module shared by several parents is
    replaced everywhere by one Int4Linear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    check_group_size(group_size, 0, "quantize_model")
    if isinstance(skip, str):
        skip = (skip,)
    # (parent, attribute) of every occurrence, so shared modules are swapped in all parents
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[int, str] = {}
    skipped: dict[str, str] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None or not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is not nn.Linear:
                skipped[name] = f"{type(child).__name__} is a subclass of nn.Linear"
                continue
            owners.setdefault(id(child), []).append((parent, attr))
            names.setdefault(id(child), name)
    if type(model) is nn.Linear:
        skipped[""] = "the root module cannot be replaced in place; use Int4Linear.from_linear"
    todo = []
    for key, name in names.items():
        parent, attr = owners[key][0]
        linear = parent._modules[attr]
        reason = _skip_reason(name, linear, skip, group_size)
        if reason:
            skipped[name] = reason
        else:
            todo.append((key, name, linear))
    replaced, before, after = [], 0, 0
    tty = not quiet and sys.stderr.isatty()
    for i, (key, name, linear) in enumerate(todo):
        if not quiet:
            msg = f"quantize_model: [{i + 1}/{len(todo)}] {name} ({linear.out_features}x{linear.in_features})"
            print(("\r\033[K" + msg) if tty else msg, end="" if tty else "\n", file=sys.stderr, flush=True)
        q = Int4Linear.from_linear(linear, group_size, symmetric, dtype, backend)
        for parent, attr in owners[key]:
            setattr(parent, attr, q)
        before += sum(t.numel() * t.element_size() for t in (linear.weight, linear.bias) if t is not None)
        after += sum(t.numel() * t.element_size() for t in (q.packed, q.scales, q.zeros, q.bias) if t is not None)
        replaced.append(name)
    if tty and todo:
        print(file=sys.stderr)
    return QuantizeSummary(replaced, skipped, before, after)
