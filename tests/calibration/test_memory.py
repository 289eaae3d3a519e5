"""The peak-memory prediction: its terms move the way the run's memory does, and a run whose prediction
exceeds the machine's memory is refused before the walk, naming flags under which it fits."""
from __future__ import annotations

import pytest

from support import assert_one_line_error, run_cli

from lowbit.calibration.memory import estimate_quantize_memory, fitting_flags, model_params
from lowbit.models.specs.base import ModelDims

SMOL = ModelDims(hidden=576, intermediate=1536, n_layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                 max_positions=8192, tied_embeddings=True)


def test_parameter_count_matches_smollm2():
    assert model_params(SMOL) == pytest.approx(134.5e6, rel=0.01)       # SmolLM2-135M: 134,515,008


def test_terms_follow_the_walk():
    rtn = estimate_quantize_memory(SMOL)
    seq = estimate_quantize_memory(SMOL, 128, 2048, "sequential")
    two = estimate_quantize_memory(SMOL, 128, 2048, "two-pass")
    off = estimate_quantize_memory(SMOL, 128, 2048, "two-pass", offload=True)
    assert rtn.total <= off.total < two.total < seq.total         # offloaded, the save can be the larger phase
    assert dict(seq.parts)["activations"] > dict(two.parts)["activations"]
    assert "statistics" in dict(seq.parts) and "save" not in dict(seq.parts)      # the walk is the larger phase
    assert estimate_quantize_memory(SMOL, 64, 2048, "two-pass").total < two.total
    assert "statistics" in two.describe() or "activations" in two.describe()


def test_fitting_flags_name_what_fits():
    est = lambda n, w, off: estimate_quantize_memory(SMOL, n, 2048, w, off)
    need = est(128, "sequential", False).total
    flags = fitting_flags(est, est(64, "sequential", False).total, 128, "sequential", False)
    assert flags[0] == "--samples 64" and "--walk two-pass" in flags and "--offload DIR" in flags
    assert fitting_flags(est, need, 128, "sequential", False)[0] == "--samples 127"
    assert fitting_flags(est, 10, 128, "sequential", False) == []


def test_a_run_above_the_machines_memory_is_refused(tiny_llama_dir, calib, tmp_path, capsys, monkeypatch):
    import lowbit.quantize as q

    monkeypatch.setattr(q, "memory_budget", lambda: 300 * 2**20)       # below the runtime alone
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--calib", calib,
                           "--samples", "4", "--seq-len", "32", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "GiB at its peak", "no calibration setting fits")
    assert not (tmp_path / "q").exists()


def test_refusal_names_fewer_samples(tiny_llama_dir, calib, tmp_path, capsys, monkeypatch):
    from transformers import AutoConfig

    import lowbit.quantize as q

    dims = ModelDims.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    budget = estimate_quantize_memory(dims, 40, 64, "sequential").total
    monkeypatch.setattr(q, "memory_budget", lambda: budget)
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--calib", calib, "--walk",
                           "sequential", "--samples", "400", "--seq-len", "64", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "--samples 40")
