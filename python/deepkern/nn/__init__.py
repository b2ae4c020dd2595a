"""Drop-in nn.Modules and model converters."""

from deepkern.nn.layernorm_gelu import LayerNormGELU, fuse_layernorm_gelu

__all__ = ["LayerNormGELU", "fuse_layernorm_gelu"]
