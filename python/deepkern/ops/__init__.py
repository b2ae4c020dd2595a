"""Op layer: validation, backend choice, custom-op registration (fake impls, autograd).

Importing this package (done by `import deepkern`) registers the Triton ops and the fake
implementations and autograd of the ops defined in deepkern._C (csrc/registration.cpp)."""

from deepkern.ops.layernorm_gelu import layernorm_gelu
from deepkern.ops.int4_matmul import int4_matmul
from deepkern.ops.sparse_attention import select_blocks, sparse_attention

# Ops whose schema lives in csrc/registration.cpp and that have a CUDA kernel; the build test
# checks each is registered with a CUDA implementation when the extension is built.
CUDA_OPS = ("layernorm_gelu_fwd", "layernorm_gelu_bwd", "int4_matmul")
# Ops implemented with Triton kernels (torch.ops.deepkern_triton.*).
TRITON_OPS = ("layernorm_gelu_fwd", "layernorm_gelu_bwd")
TRITON_OPS += ("int4_matmul", "int4_matmul_bwd")
TRITON_OPS += ("select_blocks", "sparse_attention_fwd", "sparse_attention_bwd")

__all__ = ["CUDA_OPS", "TRITON_OPS", "layernorm_gelu"]
__all__ += ["int4_matmul"]
__all__ += ["select_blocks", "sparse_attention"]
