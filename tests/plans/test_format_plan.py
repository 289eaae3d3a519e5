"""FormatPlan: first matching rule wins, default for the rest, JSON/YAML round trips, clear errors."""
from __future__ import annotations

import re

import pytest

from lowbit.formats import GGUFFormat, IntFormat, NFFormat, format_from_name
from lowbit.plans import FormatPlan

NAMES = [f"model.layers.{i}.{lin}" for i in range(3) for lin in ("self_attn.q_proj", "mlp.down_proj")]
FILE = {"default": "int4-g128-sym",
        "tensors": {"model.layers.*.mlp.down_proj": "Q6_K", "model.layers.0.*": "float",
                    "model.layers.1.self_attn.q_proj": {"family": "nf", "bits": 4, "group_size": 64}}}


def test_first_matching_rule_wins_and_default_covers_the_rest():
    plan = FormatPlan.from_dict(FILE)
    got = plan.resolve(NAMES)
    assert got["model.layers.0.mlp.down_proj"] == GGUFFormat("Q6_K")      # before the layer-0 rule
    assert got["model.layers.0.self_attn.q_proj"] is None                    # float
    assert got["model.layers.1.self_attn.q_proj"] == NFFormat(4, 64)
    assert got["model.layers.2.self_attn.q_proj"] == IntFormat(4, True, 128)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_plan_file_round_trips(tmp_path, suffix):
    plan = FormatPlan.from_dict(FILE)
    path = plan.save(tmp_path / f"plan{suffix}")
    again = FormatPlan.load(path)
    assert again.resolve(NAMES) == plan.resolve(NAMES)
    assert again.origin == f"file plan{suffix}"


def test_optional_tensors_are_planned_only_when_a_rule_names_them():
    plan = FormatPlan.from_dict({"default": "int4-g64-sym", "tensors": {"model.embed_tokens": "Q8_0"}})
    got = plan.resolve(NAMES, optional=("lm_head", "model.embed_tokens"))
    assert got["model.embed_tokens"] == GGUFFormat("Q8_0") and "lm_head" not in got


@pytest.mark.parametrize("d,needle", [
    ({"default": "int4-g128-sym", "tensors": {"model.layers.9.*": "float"}}, "matches no tensor"),
    ({"default": "int9-g128-sym"}, "bits"),
    ({"default": "Q9_K"}, "unknown to the installed gguf"),
    ({"default": "IQ2_XS"}, "no lowbit quantizer"),
    ({"defaults": "int4-g128-sym"}, "unknown plan keys"),
    ({"tensors": {"model.layers.0.*": 4}}, "a format is a name"),
])
def test_bad_plans_say_what_is_wrong(d, needle):
    with pytest.raises(ValueError, match=needle):
        FormatPlan.from_dict(d).resolve(NAMES)


def test_unreadable_or_invalid_files_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read plan"):
        FormatPlan.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid json"):
        FormatPlan.load(bad)


@pytest.mark.parametrize("name", ["int4-g128-sym", "int3-g64-asym", "int4-ch-sym-signed", "int2-tensor-sym-half",
                                  "nf4-g64", "fp8-e4m3-ch", "fp8-e5m2-tensor", "mxfp4", "Q4_K", "Q8_0", "IQ4_NL"])
def test_format_names_round_trip(name):
    assert format_from_name(name).name == name


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_per_tensor_outlier_shares_round_trip_and_first_match_wins(tmp_path, suffix):
    plan = FormatPlan.from_dict({"default": "int3-g64-sym",
                                 "outliers": {"model.layers.1.mlp.down_proj": 0.01, "model.layers.*.mlp.*": 0.005}})
    again = FormatPlan.load(plan.save(tmp_path / f"plan{suffix}"))
    assert again.outlier_share("model.layers.1.mlp.down_proj") == 0.01
    assert again.outlier_share("model.layers.2.mlp.down_proj") == 0.005
    assert again.outlier_share("model.layers.2.self_attn.q_proj") is None
    assert again.keep_float(["model.layers.0.*"]).outliers == again.outliers


@pytest.mark.parametrize("outliers,needle", [
    ({"model.layers.0.mlp.down_proj": 0.2}, "share in [0, 0.1)"),
    ({"model.layers.0.mlp.down_proj": "1%"}, "share in [0, 0.1)"),
    (["model.layers.0.mlp.down_proj"], "must map a name or pattern to a share"),
])
def test_bad_outlier_rules_are_refused(outliers, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        FormatPlan.from_dict({"default": "int3-g64-sym", "outliers": outliers})


def test_an_outlier_rule_that_matches_no_tensor_is_refused():
    plan = FormatPlan.from_dict({"default": "int3-g64-sym", "outliers": {"model.layers.7.*": 0.01}})
    with pytest.raises(ValueError, match="matches no tensor"):
        plan.resolve(NAMES)
