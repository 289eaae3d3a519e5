"""lowbit: low-bit post-training quantization of LLMs, organized around outliers."""

__version__ = "0.1.0"
