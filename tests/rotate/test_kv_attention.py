"""Simulated KV quantization (nn.kv_attention): R3 alone is an identity; K/V really are quantized (the
logits equal a model whose k/v outputs are quantized by hand where RoPE allows); it saves and reloads."""
from __future__ import annotations

import pytest
import torch

from lowbit.formats.activation import act_format_from_name, fake_quantize_act
from lowbit.models.load import load
from lowbit.nn.kv_attention import KvQuant, install_kv_quant


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_r3_alone_changes_nothing_in_float64(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    model = loaded.model.double()
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    install_kv_quant(model, loaded.spec, KvQuant(None, None, rotate=True))
    assert float((_logits(model, ids) - before).abs().max() / before.abs().max()) < 1e-12


def test_values_are_quantized_as_the_format_says(tiny_llama_dir):
    """V is not touched by RoPE: quantizing v_proj's output by hand must give the same logits."""
    loaded, by_hand = load(str(tiny_llama_dir)), load(str(tiny_llama_dir))
    fmt = act_format_from_name("a4-g8-asym")
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(1))
    before = _logits(loaded.model, ids)
    install_kv_quant(loaded.model, loaded.spec, KvQuant(None, fmt))
    head_dim = loaded.dims.head_dim
    for layer in by_hand.model.get_submodule(by_hand.spec.layers):
        layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, y: fake_quantize_act(y.reshape(-1, head_dim), fmt).reshape(y.shape))
    ours, expected = _logits(loaded.model, ids), _logits(by_hand.model, ids)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, before, atol=1e-3)            # 4-bit values do change the model


def test_a_kv_recipe_saves_and_reloads(capsys, tiny_llama_dir, calib, tmp_path):
    from support import run_cli

    recipe = tmp_path / "kv.yaml"
    recipe.write_text("steps:\n  - rotate: {seed: 1}\n  - rtn: {}\nweights: {default: int8-ch-sym}\n"
                      "activations: {default: a8-token-sym}\nkv_cache: {k: a4-g8-asym, v: a4-g8-asym, rotate: true}\n")
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out))
    assert code == 0, err
    code, printed, err = run_cli(capsys, "eval", str(out), "--text", str(calib), "--ctx", "32", "--windows", "2")
    assert code == 0, err
    assert "KV cache k a4-g8-asym, v a4-g8-asym, R3 Hadamard on q/k" in printed
    assert "online Hadamard on the input of 2 linears" in printed
    again = load(str(out))
    attention = again.model.get_submodule(f"{again.spec.layers}.0.{again.spec.attention}")
    assert attention.lowbit_kv == KvQuant(act_format_from_name("a4-g8-asym"), act_format_from_name("a4-g8-asym"), True)
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(2))
    first = _logits(again.model, ids)
    assert torch.equal(first, _logits(load(str(out)).model, ids))


def test_kv_group_must_divide_head_dim(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))                             # head_dim 24
    with pytest.raises(ValueError, match="head_dim 24"):
        install_kv_quant(loaded.model, loaded.spec, KvQuant(act_format_from_name("a4-g64-asym"), None))
