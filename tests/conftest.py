"""Shared fixtures: tiny random models built from configs (no download) and the shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch



@pytest.fixture(autouse=True, scope="session")
def _offline():
    """Every test runs as if there were no network (there is none in CI either)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


def byte_tokenizer():
    """A 256-token byte-level tokenizer with BOS, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def _tiny(config, path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a ragged hidden size (96: not a multiple of 64)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=257, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return _tiny(config, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              max_position_embeddings=256, sliding_window=16)
    return _tiny(config, tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 (q/k/v biases, grouped-query attention)."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return _tiny(config, tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """A calibration text of 3,000 common English words (seeded), for the tiny models' calibrated runs."""
    import random

    words = "the of and a to in is was for on as with by at from his that it an were are which".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path
