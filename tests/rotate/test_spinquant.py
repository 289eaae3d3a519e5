"""SpinQuant: the Cayley step stays orthogonal and descends; training through a quantized tiny model lowers
its loss and keeps RᵀR = I within 1e-6; the learned matrices save and apply again as a plan."""
from __future__ import annotations

import pytest
import torch

from lowbit.formats import format_from_name
from lowbit.formats.activation import act_format_from_name
from lowbit.models.load import load
from lowbit.rotations.hadamard import random_hadamard, random_orthogonal
from lowbit.rotations.spinquant import SpinConfig, cayley_step, learn_rotations
from support import run_cli


def _orth_error(R):
    return float((R.T @ R - torch.eye(R.shape[0], dtype=R.dtype)).abs().max())


def test_cayley_step_is_orthogonal_and_descends():
    g = torch.Generator().manual_seed(0)
    R = random_hadamard(12, 0)
    Q = random_orthogonal(12, 3)
    if torch.linalg.det(Q) < 0:               # the Cayley path keeps det R: aim inside R's component
        Q[:, 0] = -Q[:, 0]
    target = R @ Q
    losses = []
    for _ in range(200):                      # L(R) = |R − target|², G = 2 (R − target)
        losses.append(float(((R - target) ** 2).sum()))
        R = cayley_step(R, 2 * (R - target) + 1e-3 * torch.randn(12, 12, generator=g, dtype=torch.float64), 0.05)
    assert _orth_error(R) < 1e-6
    assert losses[-1] < 0.01 * losses[0]


@pytest.mark.parametrize("weights", [True, False])
def test_training_through_a_quantized_tiny_model(tiny_llama_dir, weights):
    loaded = load(str(tiny_llama_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    ids = torch.randint(0, 257, (4, 48), generator=torch.Generator().manual_seed(0))
    R1, R2 = random_hadamard(loaded.dims.hidden, 0), random_hadamard(loaded.dims.head_dim, 1)
    result = learn_rotations(loaded.model, loaded.spec, loaded.dims, ids, R1, R2, format_from_name("int3-ch-sym"),
                             act_format_from_name("a4-token-sym"), SpinConfig(steps=24, lr=1.0, weights=weights))
    assert len(result.losses) == 24 and not result.stopped_early
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first                                       # the same 4 windows cycle: the loss falls
    assert _orth_error(result.R1) < 1e-6 and _orth_error(result.R2) < 1e-6
    assert not torch.allclose(result.R1, R1)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the caller's model is untouched


def test_bad_spin_settings():
    with pytest.raises(ValueError, match="spin steps"):
        SpinConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        SpinConfig(lr=-1)
    with pytest.raises(ValueError, match="weights"):
        SpinConfig(weights="yes")


def test_spin_recipe_saves_its_rotation_and_the_file_applies_again(capsys, tiny_llama_dir, calib, tmp_path):
    recipe = tmp_path / "spin.yaml"
    recipe.write_text("steps:\n  - rotate: {seed: 0, spin_steps: 3}\n  - rtn: {}\nweights: {default: int4-ch-sym}\n"
                      "activations: {default: a4-token-sym}\nkv_cache: {k: a4-g8-asym, v: a4-g8-asym, rotate: true}\n")
    saved = tmp_path / "R.safetensors"
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--calib", str(calib),
                           "--samples", "3", "--seq-len", "32", "--save-rotation", str(saved), "--out",
                           str(tmp_path / "a"))
    assert code == 0, err
    import json

    spin = json.loads((tmp_path / "a" / "lowbit.json").read_text())["method"]["rotation"]["spin_result"]
    assert len(spin["losses"]) == 3
    again = tmp_path / "again.yaml"
    again.write_text(f"steps:\n  - rotate: {{learned: {saved}}}\n  - rtn: {{}}\nweights: {{default: int4-ch-sym}}\n"
                     "activations: {default: a4-token-sym}\nkv_cache: {k: a4-g8-asym, v: a4-g8-asym, rotate: true}\n")
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama_dir), "--recipe", str(again), "--out", str(tmp_path / "b"))
    assert code == 0, err
    a, b = load(str(tmp_path / "a")), load(str(tmp_path / "b"))
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
