"""Lazy loading from a GGUF file: each tensor de-quantized to float32 when the walk asks for it.

The in-memory path de-quantizes the whole GGUF through transformers into a float32 cache directory
first (models/load.py); a model larger than memory cannot take that route. Here the file is memory-
mapped by gguf-py's reader, and `get(hf_name)` de-quantizes that one tensor and undoes llama.cpp's
converter transforms (gguf_names: the rotary row order of Llama's q/k, Gemma's 1 + w norms), so the
values equal the ones transformers' loader gives (tests/models/test_lazy_gguf.py checks it on the real
models). The reader's mapped pages are dropped after each tensor (madvise), so they do not pile up in RSS.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from .gguf_names import family_for, gguf_name, hf_tensor

DEQUANT_ROWS = 4096       # rows de-quantized at a time: a 262144-row embedding's transients stay small


class GGUFWeights:
    """The tensors of one GGUF file by their Hugging Face names, read one at a time as float32."""

    def __init__(self, path: Path, config):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise LowbitError(f"{self.path}: unreadable GGUF ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.family = family_for(config.model_type)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def _name(self, hf_name: str) -> str:
        name, _ = gguf_name(hf_name, self.family)
        if name == "output.weight" and name not in self.tensors and self.tied:
            name = "token_embd.weight"                      # a tied head is the embedding
        return name

    def __contains__(self, hf_name: str) -> bool:
        try:
            return self._name(hf_name) in self.tensors
        except LowbitError:
            return False

    def get(self, hf_name: str) -> torch.Tensor:
        """One tensor [rows, cols] (or [n]) as float32, in transformers' layout."""
        from gguf import quants

        name = self._name(hf_name)
        if name not in self.tensors:
            raise LowbitError(f"{self.path.name} lacks {name} ({hf_name})")
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))      # GGUF lists dims fastest first
        values = torch.empty(shape, dtype=torch.float32)
        rows = values.view(-1, shape[-1])                                 # [rows, cols]; t.data is [rows, bytes]
        data = t.data.reshape(rows.shape[0], -1)
        for a in range(0, rows.shape[0], DEQUANT_ROWS):   # gguf-py's numpy de-quantizers make several
            part = quants.dequantize(data[a:a + DEQUANT_ROWS], t.tensor_type)   # copies of what they get
            rows[a:a + DEQUANT_ROWS] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)
                                                         .reshape(-1, shape[-1]))
        out = hf_tensor(hf_name, values, self.family, self.heads, self.kv_heads)
        self._drop_pages()
        return out

    def _drop_pages(self) -> None:
        """Let the kernel reclaim the mapped pages just read (they are file-backed: re-read on demand)."""
        data = getattr(self.reader, "data", None)
        base = getattr(data, "_mmap", None)
        if isinstance(base, mmap.mmap) and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            base.madvise(mmap.MADV_DONTNEED)
