"""BlockSparseAttention: the attention core (softmax(q k^T) v over selected key blocks) as a
module, for use inside an attention layer after the q/k/v projections (and RoPE)."""

from __future__ import annotations

from torch import nn

from deepkern.ops.sparse_attention import BLOCK_SIZES, sparse_attention


class BlockSparseAttention(nn.Module):
    """Block-sparse top-k attention (deepkern.sparse_attention) with fixed settings.

    forward(q, k, v, indices=None, return_indices=False): q [B, S, Hq, D], k/v [B, S, Hkv, D]
    (flash-attn layout) -> [B, S, Hq, D] (and the int32 block indices when asked). Each query
    block attends to `sink_blocks` first blocks, `local_blocks` most recent blocks (causal)
    and its `topk` best blocks by pooled score. No parameters.
    """

    def __init__(
        self,
        block_size: int = 64,
        topk: int = 16,
        sink_blocks: int = 1,
        local_blocks: int = 2,
        causal: bool = True,
        softmax_scale: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise ValueError(f"BlockSparseAttention: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
        for name, value, low in (("topk", topk, 0), ("sink_blocks", sink_blocks, 0),
                                 ("local_blocks", local_blocks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BlockSparseAttention: {name} must be an int >= {low}, got {value!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"BlockSparseAttention: causal must be a bool, got {type(causal).__name__}")
        self.block_size = block_size
        self.topk = topk
        self.sink_blocks = sink_blocks
        self.local_blocks = local_blocks
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.backend = backend

    def forward(self, q, k, v, indices=None, return_indices: bool = False):
        return sparse_attention(
            q, k, v, self.block_size, self.topk, self.sink_blocks, self.local_blocks,
            self.causal, self.softmax_scale, indices, return_indices, self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, topk={self.topk}, sink_blocks={self.sink_blocks}, "
            f"local_blocks={self.local_blocks}, causal={self.causal}"
        )
