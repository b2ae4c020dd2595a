"""Drop-in nn.Modules and model converters."""

from deepkern.nn.layernorm_gelu import LayerNormGELU, fuse_layernorm_gelu
from deepkern.nn.int4_linear import Int4Linear, QuantizeSummary, quantize_model
from deepkern.nn.sparse_attention import BlockSparseAttention

__all__ = ["LayerNormGELU", "fuse_layernorm_gelu"]
__all__ += ["Int4Linear", "QuantizeSummary", "quantize_model"]
__all__ += ["BlockSparseAttention"]
