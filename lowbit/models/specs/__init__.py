"""Architecture specs, one per family, looked up by transformers' config.model_type."""
from __future__ import annotations

from .base import ArchSpec, LinearGroup, ModelDims
from .gemma3 import GEMMA3
from .llama import LLAMA
from .qwen2 import QWEN2

SPECS: tuple[ArchSpec, ...] = (LLAMA, GEMMA3, QWEN2)


def spec_for(model_type: str) -> ArchSpec:
    """The spec covering a transformers `config.model_type`; a clear error when none does."""
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in SPECS for t in s.model_types)
    raise ValueError(f"no architecture spec for model_type {model_type!r} (known: {known})")


__all__ = ["ArchSpec", "LinearGroup", "ModelDims", "SPECS", "spec_for", "LLAMA", "GEMMA3", "QWEN2"]
