"""`lowbit plan` on the real SmolLM2 at 3.5 bits per weight (the cheap proxy loss, to stay fast), then
`lowbit quantize --plan`: the result's bits per weight lies in [3.49, 3.50]."""
from __future__ import annotations

import json

import pytest

from support import needs_smollm2, run_cli

pytestmark = [pytest.mark.real_model, needs_smollm2]


def test_plan_at_3_5_bits_lands_within_a_hundredth(tmp_path, capsys):
    plan, summary = tmp_path / "plan.yaml", tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "-q", "plan", "smollm2-135m", "--target-bpw", "3.5", "--loss", "proxy",
                           "--out", plan, "--json", summary)
    assert code == 0, err
    planned = json.loads(summary.read_text())
    assert 3.49 <= planned["bits_per_weight"] <= 3.5
    assert len(planned["by_format"]) >= 3                                 # a real mix, not one format
    code, _, err = run_cli(capsys, "-q", "quantize", "smollm2-135m", "--plan", plan, "--method", "rtn",
                           "--out", tmp_path / "q", "--json", tmp_path / "q.json")
    assert code == 0, err
    stored = json.loads((tmp_path / "q.json").read_text())["bits_per_weight"]
    assert stored == pytest.approx(planned["bits_per_weight"], abs=1e-9) and 3.49 <= stored <= 3.5
