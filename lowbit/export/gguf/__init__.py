"""GGUF export: key/values (metadata), vocabularies (vocab), exact integer re-expression (lossless), the writer.

`TARGET` is the `lowbit export --format gguf` entry of lowbit.export.registry.
"""
from .target import TARGET

__all__ = ["TARGET"]
