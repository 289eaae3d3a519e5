"""Shared pieces of the GGUF export tests: tiny HF models whose tokenizer llama.cpp can load.

conftest's tiny models have a byte-level BPE without merges, which GGUF cannot store (llama.cpp
requires tokenizer.ggml.merges and GGUF forbids empty arrays), so these copies add two merges
and grow the embedding by the two merged tokens.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

MERGES = [("Ġ", "t"), ("h", "e")]


def merges_tokenizer():
    """258 byte-level BPE tokens + two merges + BOS "<s>" (id 260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def with_merges(src: Path, dst: Path) -> Path:
    """A copy of the tiny HF model at `src` whose tokenizer has merges (embedding grown to match)."""
    from transformers import AutoModelForCausalLM

    tokenizer = merges_tokenizer()
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """GGUF name -> (type name, shape [rows, row_length], raw data) read back with gguf.GGUFReader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    # GGUFReader's shape is ggml's ne (row length first): reverse it into PyTorch order
    return {t.name: (t.tensor_type.name, tuple(int(s) for s in reversed(list(t.shape))), t.data)
            for t in reader.tensors}
