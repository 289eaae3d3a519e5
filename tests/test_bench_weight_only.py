"""bench/weight_only.py's resumable state: rows committed in the result JSON count as measured."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _weight_only():
    # the script imports its sibling `common`, as when run directly; leave no `common` behind
    # (tests/test_bench_layout.py reads sys.modules)
    had_common = "common" in sys.modules
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_weight_only", BENCH / "weight_only.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
        if not had_common:
            sys.modules.pop("common", None)
    return module


def test_load_state_takes_measured_rows_from_the_json_and_keeps_the_work_record(tmp_path):
    wo = _weight_only()
    state_file, json_file = tmp_path / "rows.json", tmp_path / "weight_only.json"
    fresh = {"model": "m", "setting": "W4 g64", "method": "gptq", "ppl": 25.0, "dir": "/x"}
    state_file.write_text(json.dumps({wo.row_key("m", "W4 g64", "gptq"): fresh}))
    json_file.write_text(json.dumps({"rows": [
        {"model": "m", "setting": "W4 g64", "method": "gptq", "ppl": 99.0},        # older: the work record wins
        {"model": "m", "setting": "W3 g64", "method": "awq", "ppl": 46.0},         # measured elsewhere: kept
        {"model": "m", "setting": "W3 g64", "method": "peer", "error": "refused"},  # a failure is a result too
        {"model": "m", "setting": "W3 g64", "method": "hqq", "ppl": 1.0, "result_file": "p.json"},  # peer file's
        {"model": "m", "setting": "W2 g64", "method": "rtn"},                      # never evaluated: not done
    ]}))
    state = wo.load_state(state_file, json_file)
    assert state[wo.row_key("m", "W4 g64", "gptq")]["ppl"] == 25.0
    assert state[wo.row_key("m", "W3 g64", "awq")]["ppl"] == 46.0
    assert state[wo.row_key("m", "W3 g64", "peer")]["error"] == "refused"
    assert set(state) == {wo.row_key("m", s, meth) for s, meth in
                          [("W4 g64", "gptq"), ("W3 g64", "awq"), ("W3 g64", "peer")]}
    assert wo.load_state(tmp_path / "none.json", tmp_path / "none2.json") == {}
