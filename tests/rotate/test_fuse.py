"""Fused rotations (R1 on the residual, R2 per head, online R4 before down_proj) leave the model's
function unchanged in float64, on tiny Llama and Qwen2 models and on real SmolLM2; Gemma 3 is refused
with its reason; a rotated, quantized model saves and reloads with its online transform."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.models.load import load
from lowbit.rotations.fuse import check_rotatable, fuse_norms, rotate_residual
from lowbit.rotations.plan import RotationConfig, rotate
from support import needs_smollm2


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    """transformers computes Llama's and Qwen2's RMSNorm in float32 even in a float64 model."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def norm64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", norm64)
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", norm64)


def _randomize_norms_and_biases(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():       # random norms and biases, so that folding and rotating them is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return g


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("config", [RotationConfig(), RotationConfig(kind="random", seed=3),
                                    RotationConfig(r2=False, r4=False)])
def test_rotations_are_function_preserving_in_float64(request, arch, config):
    loaded = load(str(request.getfixturevalue(arch)))
    model = loaded.model.double()
    g = _randomize_norms_and_biases(model)
    ids = torch.randint(0, 257, (2, 24), generator=g)
    with torch.no_grad():
        before = model(ids).logits
    matrices = rotate(model, loaded.spec, loaded.dims, config)
    for R in matrices.values():                       # every matrix used is orthogonal
        assert torch.allclose(R.T @ R, torch.eye(R.shape[0], dtype=R.dtype), atol=1e-12)
    with torch.no_grad():
        after = model(ids).logits
    assert _rel(after, before) < 1e-9
    head, embed = model.get_submodule(loaded.spec.head), model.get_submodule(loaded.spec.embed)
    assert head.weight.data_ptr() != embed.weight.data_ptr() and not model.config.tie_word_embeddings
    assert not torch.allclose(embed.weight, load(str(request.getfixturevalue(arch))).model.double()
                              .get_submodule(loaded.spec.embed).weight)   # it really rotated


def test_r1_needs_fused_norms_and_an_orthogonal_matrix(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    model, spec = loaded.model.double(), loaded.spec
    _randomize_norms_and_biases(model)
    with pytest.raises(ValueError, match="fuse the norms"):
        rotate_residual(model, spec, torch.eye(loaded.dims.hidden, dtype=torch.float64))
    fuse_norms(model, spec)
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate_residual(model, spec, 2 * torch.eye(loaded.dims.hidden, dtype=torch.float64))


def test_gemma3_is_refused_with_its_reason(tiny_gemma3_dir):
    loaded = load(str(tiny_gemma3_dir))
    with pytest.raises(ValueError, match="post_attention_layernorm.*residual rotation"):
        check_rotatable(loaded.spec)
    with pytest.raises(ValueError, match="refused"):
        rotate(loaded.model, loaded.spec, loaded.dims, RotationConfig())


@pytest.mark.parametrize("bad", [1.5, "3", True])
def test_seed_must_be_an_integer(bad):
    with pytest.raises(ValueError, match="seed must be an integer"):
        RotationConfig(seed=bad)


def test_rotated_quantized_model_saves_and_reloads(tiny_llama_dir, tmp_path):
    from lowbit.export.lowbit_dir import save_quantized
    from lowbit.formats import format_from_name
    from lowbit.quantize import QuantizeConfig, quantize

    loaded = load(str(tiny_llama_dir))
    rotate(loaded.model, loaded.spec, loaded.dims, RotationConfig(seed=7))
    quantize(loaded, QuantizeConfig(fmt=format_from_name("int8-ch-sym")), progress=False)
    down = loaded.model.get_submodule(f"{loaded.spec.layers}.0.{loaded.spec.down}")
    assert down.input_transform == "hadamard"
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(ids).logits
    out = save_quantized(loaded, {"method": "rtn"}, tmp_path / "q")
    entries = json.loads((out / "lowbit.json").read_text())["tensors"]
    assert entries[f"{loaded.spec.layers}.1.{loaded.spec.down}"]["input_transform"] == "hadamard"
    assert "input_transform" not in entries[f"{loaded.spec.layers}.1.self_attn.o_proj"]
    again = load(str(out))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, before)


@pytest.mark.real_model
@needs_smollm2
def test_real_smollm2_rotated_equals_the_original_in_float64():
    loaded = load("smollm2-135m")
    model = loaded.model.double()
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345, 30, 378, 1156, 314, 260, 3329, 282, 48, 4126, 30]])
    with torch.no_grad():
        before = model(ids).logits
    rotate(model, loaded.spec, loaded.dims, RotationConfig(seed=0))
    with torch.no_grad():
        after = model(ids).logits
    assert _rel(after, before) < 1e-9


def test_an_order_without_hadamard_falls_back_to_random_orthogonal_with_a_warning(tmp_path):
    """hidden 172 = 4·43 and head_dim 86 have no construction here: R1/R2 become Haar orthogonal (warned), the
    model still computes the same function; R4 needs a real Hadamard (intermediate 128 has one)."""
    from conftest import _tiny
    from transformers import LlamaConfig

    path = _tiny(LlamaConfig(vocab_size=257, hidden_size=172, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64), tmp_path / "m")
    loaded = load(str(path))
    model = loaded.model.double()
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="172"):
        rotate(model, loaded.spec, loaded.dims, RotationConfig())
    with torch.no_grad():
        assert _rel(model(ids).logits, before) < 1e-9
