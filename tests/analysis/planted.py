"""A tiny random Llama with three planted outliers, each at a known place, and its fixtures.

Test modules import the fixtures (`from planted import planted_dir, planted_report`); they are
built once per session whichever module asks first.

- an outlier feature: hidden dimension FEATURE is scaled by 20 in every norm that feeds a
  linear, so the attention and MLP inputs reach |x| >= 6 there at most positions of every layer;
- a super weight: layer 0's MLP channel SW_COL fires only on BOS (its gate and up rows read
  only the BOS-only embedding dimension BOS_DIM), and down_proj W[SW_ROW, SW_COL] = 4 writes it
  into hidden dimension SW_ROW;
- so a massive activation: dimension SW_ROW of the residual stream at position 0 (BOS),
  about 1000 from layer 0 on, where the median |h| is about 0.7.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FEATURE, BOS_DIM, SW_ROW, SW_COL, N_LAYERS = 10, 3, 40, 77, 4


def build_planted(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_token_id
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=bos, eos_token_id=bos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.mul_(50)                                 # unit-scale token vectors: small layer outputs stay small
        emb[:, BOS_DIM] = 0
        emb[bos] = 0
        emb[bos, BOS_DIM] = 1.0                      # BOS points along BOS_DIM, nothing else does
        for layer in model.model.layers:
            layer.input_layernorm.weight[FEATURE] = 20.0
            layer.post_attention_layernorm.weight[FEATURE] = 20.0
        mlp = model.model.layers[0].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[SW_COL] = 0
            proj.weight[SW_COL, BOS_DIM] = 2.0       # x_k = silu(2 * 8) * (2 * 8) = 256 on BOS only
        mlp.down_proj.weight[SW_ROW, SW_COL] = 4.0   # y_j = 1024 on BOS
        model.lm_head.weight.mul_(10)                # confident predictions, so that changes show in the KLD
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# small enough to be quick, long enough that one position (BOS) stays under 6% of the positions
ARGS = ["--samples", "3", "--seq-len", "64", "--eval-tokens", "64", "--sens-bits", "4"]
_BUILT: dict = {}


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    if "dir" not in _BUILT:
        _BUILT["dir"] = build_planted(tmp_path_factory.mktemp("planted"))
    return _BUILT["dir"]


@pytest.fixture(scope="session")
def planted_report(planted_dir, tmp_path_factory) -> tuple[dict, Path]:
    """(report dict, output dir) of `lowbit analyze` on the planted model at default thresholds."""
    if "report" not in _BUILT:
        from lowbit.cli.main import main

        out = tmp_path_factory.mktemp("report")
        assert main(["analyze", str(planted_dir), "--out", str(out), *ARGS]) == 0
        _BUILT["report"] = (json.loads((out / "report.json").read_text()), out)
    return _BUILT["report"]
