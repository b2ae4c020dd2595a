"""Readable PyTorch references (fp32 math, or the input's precision when it is fp64). The
tests compare every kernel against these; the "torch" backend runs them."""

from deepkern.reference.layernorm_gelu import layernorm_gelu_ref

__all__ = ["layernorm_gelu_ref"]
