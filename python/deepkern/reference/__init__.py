"""Readable PyTorch references (fp32 math, or the input's precision when it is fp64). The
tests compare every kernel against these; the "torch" backend runs them."""

from deepkern.reference.layernorm_gelu import layernorm_gelu_ref
from deepkern.reference.int4_matmul import int4_matmul_ref
from deepkern.reference.sparse_attention import select_blocks_ref, sparse_attention_ref

__all__ = ["layernorm_gelu_ref"]
__all__ += ["int4_matmul_ref"]
__all__ += ["select_blocks_ref", "sparse_attention_ref"]
