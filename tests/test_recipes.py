"""Recipes and activation quantization through `lowbit quantize`: built-ins, user files, the
bad-input errors (one line, exit 2, nothing written), and save/reload of every activation format."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.export.lowbit_dir import load_quantized
from lowbit.models.load import load
from lowbit.models.registry import resolve
from lowbit.nn.qlinear import QuantLinear
from lowbit.recipes import builtin_names, load_recipe
from support import assert_one_line_error, run_cli

SMALL = ["--samples", "4", "--seq-len", "64"]
BUILTINS = ["w8a8-naive", "w8a8-static", "w8a8-smoothquant", "w8a8-smoothquant-static", "llm-int8",
            "w4a8-smoothquant", "w4a4-naive", "quarot-w4a4kv4", "quarot-w4a8", "spinquant-w4a4kv4", "quip-w2", "quip-w3"]


def test_the_issue_s_recipes_are_built_in_and_parse():
    assert set(BUILTINS) <= set(builtin_names())
    for name in builtin_names():
        r = load_recipe(name)
        assert r.description and r.weights.default is not None
        assert r.activations is not None or name.startswith("quip-")     # QuIP's recipes are weight-only
    assert load_recipe("w8a8-smoothquant").method == "smooth"
    assert load_recipe("w4a8-smoothquant").method == "smooth+gptq"
    assert load_recipe("llm-int8").activations.default.outlier_threshold == 6.0
    assert load_recipe("w8a8-smoothquant-static").activations.default.static
    assert load_recipe("quarot-w4a4kv4").kv.rotate and load_recipe("quarot-w4a4kv4").rotation.kind == "hadamard"
    assert load_recipe("spinquant-w4a4kv4").rotation.spin_steps == 100
    assert load_recipe("quip-w2").incoherence is not None


def test_recipes_verb_lists_one_line_each(capsys):
    code, out, err = run_cli(capsys, "recipes")
    assert code == 0, err
    for name in BUILTINS:
        assert sum(line.startswith(name + " ") for line in out.splitlines()) == 1


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("recipe", ["w8a8-smoothquant-static", "llm-int8", "w4a8-smoothquant"])
def test_recipe_end_to_end_saves_reloads_and_evaluates(capsys, tmp_path, tiny_llama_dir, calib, recipe):
    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", tiny_llama_dir, "--recipe", recipe, "--calib", calib, *SMALL,
                                "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "lowbit.json").read_text())
    entry = manifest["tensors"]["model.layers.0.mlp.down_proj"]
    assert entry["activations"]["family"] == "act"
    assert manifest["method"]["activations"]["default"] == load_recipe(recipe).activations.default.name
    reloaded = load(str(out)).model
    assert all(m.act is not None for m in reloaded.modules() if isinstance(m, QuantLinear))
    code, stdout, err = run_cli(capsys, "eval", out, "--text", calib, "--ctx", 64, "--windows", 2)
    assert code == 0, err


def test_user_recipe_file(capsys, tmp_path, tiny_llama_dir, calib):
    path = tmp_path / "mine.yaml"
    path.write_text("description: per-channel W4A8\nsteps:\n  - smooth: {alpha: search}\n  - gptq: {act_order: false}\n"
                    "weights: {default: int4-ch-sym-signed, tensors: {'model.layers.0.*': int8-ch-sym}}\n"
                    "activations: {default: a8-token-sym}\n")
    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", tiny_llama_dir, "--recipe", path, "--calib", calib, *SMALL,
                                "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["method"]["method"] == "smooth+gptq" and manifest["method"]["smooth"]["alpha"] == "search"
    assert manifest["method"]["gptq"]["act_order"] is False
    assert manifest["tensors"]["model.layers.0.self_attn.q_proj"]["format"]["bits"] == 8
    assert manifest["tensors"]["model.layers.1.self_attn.q_proj"]["format"]["bits"] == 4


@pytest.mark.parametrize("act", ["a8-token-sym", "a8-tensor-sym", "a8-static-sym", "a8-static-sym-p99",
                                 "a4-token-asym-clip0.9", "a8-token-sym-split6", "a4-g32-sym"])
def test_every_activation_format_round_trips_through_save_and_reload(capsys, tmp_path, tiny_llama_dir, calib, act):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--bits", "8", "--group", "0", "--act", act,
                           "--calib", calib, *SMALL, "--out", out)
    assert code == 0, err
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    first = load_quantized(resolve(str(out)))
    again = load_quantized(resolve(str(out)))
    modules = [m for m in first.model.modules() if isinstance(m, QuantLinear)]
    assert modules and all(m.act.name == act for m in modules)
    if "static" in act:
        assert all(float(m.input_scale) > 0 for m in modules)
    assert torch.equal(_logits(first.model, ids), _logits(again.model, ids))


BAD = [
    (["--recipe", "w8a8-static"], "a8-static-sym", "--calib"),
    (["--act", "a8-static-sym"], "a8-static-sym", "--calib"),
    (["--recipe", "w8a8-smoothquat"], "unknown recipe", "w8a8-smoothquant"),
    (["--recipe", "llm-int8", "--outlier-threshold", "0"], "--outlier-threshold", "> 0"),
    (["--recipe", "llm-int8", "--outlier-threshold", "-6"], "--outlier-threshold", "> 0"),
    (["--recipe", "llm-int8", "--bits", "8", "--method", "gptq"], "--recipe", "--method"),
    (["--act", "a9-token-sym"], "--act", "bits"),
    (["--recipe", "w8a8-smoothquant", "--alpha", "1.5"], "--alpha", "[0, 1]"),
]


@pytest.mark.parametrize("case", BAD, ids=[" ".join(c[0]) for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_llama_dir, case):
    flags, *needles = case
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, *flags, "--out", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("body, needles", [
    ("steps:\n  - spin: {}\nweights: {default: int8-ch-sym}\n", ("unknown step 'spin'", "smooth", "rotate")),
    ("steps:\n  - smooth: {beta: 0.5}\nweights: {default: int8-ch-sym}\n", ("unknown option beta", "alpha")),
    ("steps:\n  - rtn: {}\nweights: {default: int8-ch-sym}\nactivations: {default: int8-ch-sym}\n",
     ("activation plan",)),
    ("steps:\n  - rtn: {}\nweights: {default: int8-ch-sym}\ncolour: red\n", ("unknown key colour",)),
    ("steps: [gptq, smooth]\nweights: {default: int8-ch-sym}\n", ("rounding",)),
])
def test_bad_recipe_files(capsys, tmp_path, tiny_llama_dir, body, needles):
    path = tmp_path / "r.yaml"
    path.write_text(body)
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--recipe", path, "--out", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()
