"""GGUF export: llama.cpp's mixes (mixes), tensor names (names), key/values (metadata), the writer.

`TARGET` is the `lowbit export --format gguf` entry of lowbit.export.registry.
"""
from .target import TARGET

__all__ = ["TARGET"]
