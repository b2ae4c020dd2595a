"""deepkern: fast GPU kernels for efficient transformers.

Ops (each with backend="auto" | "cuda" | "triton" | "torch"):
    layernorm_gelu   fused LayerNorm/RMSNorm + GELU, forward and backward

`import deepkern` never fails because the compiled extension is missing; `has_cuda_ext()`
says whether it loaded, and `python -m deepkern.info` says which backend serves what.
"""

__version__ = "0.1.0"

from deepkern._backend import BackendUnavailableError
from deepkern._ext import cuda_ext_error, has_cuda_ext
from deepkern.ops.layernorm_gelu import layernorm_gelu
from deepkern.ops.int4_matmul import int4_matmul
from deepkern.ops.sparse_attention import select_blocks, sparse_attention
from deepkern import nn  # noqa: E402  (modules need the ops above)
from deepkern import quant  # noqa: E402
from deepkern.nn.int4_linear import quantize_model  # noqa: E402

__all__ = [
    "BackendUnavailableError",
    "cuda_ext_error",
    "has_cuda_ext",
    "int4_matmul",
    "layernorm_gelu",
    "nn",
    "quant",
    "quantize_model",
    "select_blocks",
    "sparse_attention",
]
