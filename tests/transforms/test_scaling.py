"""Folding AWQ-style scales is function-preserving (float64, per architecture); plans round-trip."""
from __future__ import annotations

import pytest
import torch

from lowbit.models.load import load
from lowbit.models.specs import QWEN2, spec_for
from lowbit.transforms import ScalePlan, apply_plan, fold_scales, source_scales, tie_to_source


ARCHS = ["tiny_llama_dir", "tiny_gemma3_dir", "tiny_qwen2_dir"]


def _float64_model(path):
    loaded = load(str(path))
    model = loaded.model.double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random norm weights and biases, so that folding them is really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                # multiples of 2**-10: Gemma's float32 (1 + w) and (1 + w) / s - 1 stay exact for s = 2**-k
                p.copy_(torch.round(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3 * 1024) / 1024)
    return loaded, model


def _random_plan(model, spec, powers_of_two_on_norms=False, seed=0) -> ScalePlan:
    """Random positive scales for every group of every layer, tied across GQA repeats."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    plan = ScalePlan()
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        plan.scales[i] = {}
        for group in spec.groups:
            width = layer.get_submodule(group.linears[0]).in_features
            if powers_of_two_on_norms and group.source_kind == "norm":
                s = 2.0 ** -torch.randint(0, 3, (width,), generator=g).double()  # 1, 1/2, 1/4
            else:
                s = torch.exp(torch.randn(width, generator=g, dtype=torch.float64))
            if group.source_kind == "linear":
                s = tie_to_source(s, layer.get_submodule(group.source).out_features, head_dim)
            plan.scales[i][group.source] = s
    return plan


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_random_plan_preserves_logits(request, arch):
    loaded, model = _float64_model(request.getfixturevalue(arch))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    gemma = loaded.spec.norm_offset != 0
    plan = _random_plan(model, loaded.spec, powers_of_two_on_norms=gemma)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, loaded.spec, plan)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert any("o_proj" in k for k in changed) and any("v_proj" in k for k in changed)
    after = _logits(model, ids)
    rel = (after - before).norm() / before.norm()
    assert rel < 1e-10, float(rel)


def test_gemma_fold_uses_the_one_plus_weight_convention(tiny_gemma3_dir):
    """Gemma's RMSNorm computes x̂·(1 + w) in float32 even in a float64 model, so arbitrary scales
    are preserved to float32 precision only (the exact test above uses power-of-two scales)."""
    loaded, model = _float64_model(tiny_gemma3_dir)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    apply_plan(model, loaded.spec, _random_plan(model, loaded.spec, seed=5))
    rel = (_logits(model, ids) - before).norm() / before.norm()
    assert rel < 1e-5, float(rel)


def test_qwen2_spec_matches_a_real_instance(tiny_qwen2_dir):
    loaded = load(str(tiny_qwen2_dir))
    assert loaded.spec is QWEN2 and spec_for("qwen2") is QWEN2
    layer = loaded.model.get_submodule(QWEN2.layers)[0]
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(QWEN2.linears)
    with_bias = {n for n in linears if layer.get_submodule(n).bias is not None}
    assert with_bias == set(QWEN2.biases)
    for group in QWEN2.groups:
        source = layer.get_submodule(group.source)
        for name in group.linears:
            assert layer.get_submodule(name).in_features in (source.weight.shape[0], 2 * source.weight.shape[0])


def test_gqa_scales_must_be_tied():
    s = torch.arange(1.0, 17.0)  # o_proj input 16 = 2 kv heads x 2 repeats x head_dim 4
    with pytest.raises(ValueError, match="equal across the repeats"):
        source_scales(s, 8, head_dim=4)
    tied = tie_to_source(s, 8, head_dim=4)
    assert tied.shape == (16,)
    assert torch.equal(tied[:4], tied[4:8]) and torch.equal(tied[8:12], tied[12:16])
    assert torch.equal(source_scales(tied, 8, head_dim=4), torch.cat([tied[:4], tied[8:12]]))
    assert torch.equal(tie_to_source(s[:8], 8, head_dim=4), s[:8])  # no GQA: unchanged


def test_fold_rejects_bad_scales(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    layer = loaded.model.get_submodule(loaded.spec.layers)[0]
    group = loaded.spec.groups[0]
    for bad in (torch.zeros(96), -torch.ones(96), torch.ones(95)):
        with pytest.raises(ValueError):
            fold_scales(layer, group, bad)


def test_plan_round_trip(tmp_path, tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    plan = _random_plan(loaded.model, loaded.spec)
    plan.clips[1] = {"mlp.down_proj": torch.rand(96, 3).clamp(min=0.5)}
    plan.meta = {"method": "awq", "format": {"family": "int", "bits": 4}}
    back = ScalePlan.load(plan.save(tmp_path / "plan"))
    assert back.meta == plan.meta
    assert set(back.scales) == set(plan.scales) and set(back.clips) == {1}
    for i, entries in plan.scales.items():
        for name, s in entries.items():
            torch.testing.assert_close(back.scales[i][name], s.float())
    torch.testing.assert_close(back.clips[1]["mlp.down_proj"], plan.clips[1]["mlp.down_proj"])
    with pytest.raises(ValueError, match="not a readable scale plan"):
        ScalePlan.load(tmp_path / "missing")
