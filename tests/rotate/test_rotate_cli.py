"""`lowbit quantize --rotate` / rotating recipes: a run end to end on a tiny model, and bad input as
one line with nothing written."""
from __future__ import annotations

import json

import pytest

from support import assert_one_line_error, run_cli


def test_quarot_recipe_runs_and_the_model_reloads(capsys, tiny_llama_dir, calib, tmp_path):
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.load import load

    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama_dir), "--recipe", "quarot-w4a8", "--calib", str(calib),
                           "--samples", "4", "--seq-len", "64", "--rotate-seed", "5", "--out", str(out))
    assert code == 0, err
    manifest = json.loads((out / "lowbit.json").read_text())
    rotation = manifest["method"]["rotation"]
    assert {k: rotation[k] for k in ("kind", "seed", "r2", "r4", "learned", "spin_steps")} == \
        {"kind": "hadamard", "seed": 5, "r2": True, "r4": True, "learned": None, "spin_steps": 0}
    downs = [e for n, e in manifest["tensors"].items() if n.endswith("mlp.down_proj")]
    assert downs and all(e["input_transform"] == "hadamard" for e in downs)
    loaded, fp = load(str(out)), load(str(tiny_llama_dir))
    ids = loaded.tokenizer("the cat sat on the mat " * 8, return_tensors="pt").input_ids[0]
    ppl, fp_ppl = (evaluate(m.model, ids, 32, progress=False).ppl for m in (loaded, fp))
    assert abs(ppl / fp_ppl - 1) < 0.05                 # W4A8 of a rotated random model stays near its float


@pytest.mark.parametrize("flags, needle", [
    (["--rotate", "hadamard", "--rotate-seed", "1.5"], "--rotate-seed must be an integer"),
    (["--rotate", "hadamard", "--rotate-seed", "x"], "--rotate-seed must be an integer"),
    (["--rotate", "givens"], "unknown rotation kind"),
    (["--rotate-seed", "3"], "--rotate-seed needs --rotate"),
])
def test_bad_rotation_flags_are_one_line(capsys, tiny_llama_dir, tmp_path, flags, needle):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama_dir), "--bits", "8", *flags, "--out", str(out))
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_rotating_gemma3_is_refused_with_the_reason(capsys, tiny_gemma3_dir, tmp_path):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", str(tiny_gemma3_dir), "--bits", "8", "--rotate", "hadamard",
                           "--out", str(out))
    assert_one_line_error(code, err, "gemma3", "post_attention_layernorm", "residual rotation")
    assert not out.exists()


def test_recipe_with_rotation_not_first_is_refused(capsys, tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - smooth: {alpha: 0.5}\n  - rotate: {seed: 0}\n  - rtn: {}\n"
                      "weights: {default: int8-ch-sym}\n")
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--out",
                           str(tmp_path / "q"))
    assert_one_line_error(code, err, "rotate is the first step")


def test_exports_refuse_online_rotations(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    assert run_cli(capsys, "quantize", str(tiny_llama_dir), "--bits", "4", "--group", "32", "--rotate", "hadamard",
                   "--out", str(out))[0] == 0
    code, _, err = run_cli(capsys, "export", str(out), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"))
    assert_one_line_error(code, err, "online", "refused")
    assert not (tmp_path / "ct").exists()


def test_rotate_seed_keeps_the_recipes_spinquant_settings():
    import argparse

    from lowbit.cli.quantize import _rotation
    from lowbit.recipes import load_recipe

    recipe = load_recipe("spinquant-w4a4kv4")
    rotation = _rotation(argparse.Namespace(rotate=None, rotate_seed="3"), recipe)
    assert rotation.seed == 3 and rotation.spin_steps == recipe.rotation.spin_steps > 0
    assert rotation.spin == recipe.rotation.spin
