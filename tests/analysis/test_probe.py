"""Replaying from a layer gives the float model's own logits; edits put the weights back; hooks go away."""
from __future__ import annotations

import pytest
import torch

from lowbit.analysis.probe import Probe, fake_quantized, zeroed
from lowbit.calibration.capture_tokens import capture_token_inputs, start_at_layer
from lowbit.formats import make_format
from lowbit.models.load import load


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_replay_from_any_layer_matches_the_full_forward(request, fixture):
    loaded = load(str(request.getfixturevalue(fixture)))
    rows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    probe = Probe(loaded.model, loaded.spec, rows)
    for start in range(loaded.dims.n_layers):
        score = probe.score(start)
        assert score["kld"] < 1e-6 and score["top1_changed"] == 0
        assert score["ppl"] == pytest.approx(probe.ppl, rel=1e-3)          # 4 significant digits
    layers = loaded.model.get_submodule(loaded.spec.layers)
    assert all("forward" not in vars(layer) for layer in layers)


def test_edits_restore_the_weights(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    down = loaded.model.get_submodule(f"{loaded.spec.layers}.1.{loaded.spec.down}")
    before = down.weight.detach().clone()
    with zeroed(loaded.model, loaded.spec, [(1, 3, 4), (1, 5, 6)]):
        assert down.weight[3, 4] == 0 and down.weight[5, 6] == 0
    assert torch.equal(down.weight, before)
    with fake_quantized([down], make_format("int", bits=3, group_size=32)):
        assert not torch.equal(down.weight, before)
    assert torch.equal(down.weight, before)


def test_edit_changes_the_score(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    rows = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    probe = Probe(loaded.model, loaded.spec, rows)
    layer = loaded.model.get_submodule(f"{loaded.spec.layers}.1")
    with fake_quantized([layer.get_submodule(n) for n in loaded.spec.linears], make_format("int", bits=2, group_size=32)):
        assert probe.score(1)["kld"] > 0


def test_capture_hooks_are_removed(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    name = f"{loaded.spec.layers}.0.{loaded.spec.down}"
    module = loaded.model.get_submodule(name)
    with pytest.raises(RuntimeError):
        with capture_token_inputs(loaded.model, [name]):
            assert len(module._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(module._forward_pre_hooks) == 0
    with pytest.raises(ValueError):
        with start_at_layer(loaded.model, loaded.spec, 5, None):
            pass
