"""GGUF (ggml) block and K-quant formats: byte layouts, quantizers, bit-exact dequantizers.

Legacy 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) and K-quant 256-weight
super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). Self-contained: the file writer comes later.
"""
from lowbit.formats.gguf.layout import QK_K, BlockLayout, Field
from lowbit.formats.gguf.registry import GGUF_TYPES, GGUFType, dequantize_gguf, gguf_type, quantize_gguf

__all__ = ["QK_K", "BlockLayout", "Field", "GGUF_TYPES", "GGUFType", "dequantize_gguf", "gguf_type", "quantize_gguf"]
