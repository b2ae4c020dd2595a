"""INT4 weight formats: quantize, pack, dequantize (see deepkern.quant.int4 for the layout)."""

from deepkern.quant.int4 import (
    GROUP_SIZES,
    LAYOUT_VERSION,
    Int4Weight,
    dequantize_parts,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

__all__ = [
    "GROUP_SIZES",
    "LAYOUT_VERSION",
    "Int4Weight",
    "dequantize_parts",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]
