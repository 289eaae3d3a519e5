"""Plan files, recipe files and calibration texts that are wrong in arbitrary ways: `lowbit quantize`
either runs or exits 2 with one `lowbit: error:` line — never a traceback or a hang."""
from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import FAST, SLOW, bounded
from support import run_cli

SCALAR = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=8)
FORMATS = st.sampled_from(["int4-g32-sym", "int2-g32-sym", "float", "Q4_K", "nf4-g32", "a8-token-sym", "int9-g7",
                           "", "int4-g0-sym"]) | SCALAR
NAMES = st.sampled_from(["model.layers.0.mlp.down_proj", "model.layers.*", "*", "lm_head", "model.embed_tokens",
                         "model.layers.9.*", ""]) | st.text(max_size=10)
PLAN = st.fixed_dictionaries({}, optional={"default": FORMATS, "tensors": st.dictionaries(NAMES, FORMATS, max_size=4)
                                           | VALUE, "origin": SCALAR, "extra": VALUE})
STEP = st.dictionaries(st.sampled_from(["smooth", "gptq", "awq", "rtn", "rotate", "incoherence", "bogus"]),
                       st.dictionaries(st.text(max_size=8), SCALAR, max_size=2) | SCALAR, min_size=1, max_size=1)
RECIPE = st.fixed_dictionaries({}, optional={"description": SCALAR, "steps": st.lists(STEP, max_size=3) | VALUE,
                                             "weights": st.dictionaries(st.sampled_from(["default", "model.layers.*"]),
                                                                        FORMATS, max_size=2) | VALUE,
                                             "activations": VALUE, "kv_cache": VALUE})


def _quantize(capsys, model, tmp_path, *flags):
    with bounded(60):
        code, _, err = run_cli(capsys, "-q", "quantize", model, *flags, "--out", tmp_path / "out", "--overwrite")
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert len([l for l in err.strip().splitlines() if l.startswith("lowbit: error:")]) == 1, err


@FAST
@given(doc=PLAN, as_yaml=st.booleans())
def test_a_wrong_plan_file_runs_or_is_one_line(tiny_llama_dir, tmp_path_factory, capsys, doc, as_yaml):
    tmp = tmp_path_factory.mktemp("plan")
    path = tmp / ("plan.yaml" if as_yaml else "plan.json")
    path.write_text(yaml.safe_dump(doc) if as_yaml else json.dumps(doc))
    _quantize(capsys, str(tiny_llama_dir), tmp, "--plan", path, "--method", "rtn")


@FAST
@given(doc=RECIPE)
def test_a_wrong_recipe_file_runs_or_is_one_line(tiny_llama_dir, tmp_path_factory, capsys, doc, calib):
    tmp = tmp_path_factory.mktemp("recipe")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    _quantize(capsys, str(tiny_llama_dir), tmp, "--recipe", path, "--calib", calib, "--samples", "2", "--seq-len", "32")


@FAST
@given(raw=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_a_strange_calibration_text_runs_or_is_one_line(tiny_llama_dir, tmp_path_factory, capsys, raw):
    tmp = tmp_path_factory.mktemp("calib")
    path = tmp / "calib.txt"
    path.write_bytes(raw)
    _quantize(capsys, str(tiny_llama_dir), tmp, "--method", "gptq", "--calib", path, "--samples", "2",
              "--seq-len", "16")


@pytest.mark.slow
@SLOW
@given(doc=PLAN | RECIPE | VALUE)
def test_any_yaml_document_as_plan_and_recipe(tiny_llama_dir, tmp_path_factory, capsys, doc, calib):
    tmp = tmp_path_factory.mktemp("any")
    path = tmp / "doc.yaml"
    path.write_text(yaml.safe_dump(doc))
    _quantize(capsys, str(tiny_llama_dir), tmp, "--plan", path, "--method", "rtn")
    _quantize(capsys, str(tiny_llama_dir), tmp, "--recipe", path, "--calib", calib, "--samples", "2", "--seq-len", "32")
