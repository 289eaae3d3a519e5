"""`lowbit quantize --method gptq|awq|awq+gptq` end to end on tiny models, and its bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli.main import main
from lowbit.data.calibration import CalibConfig
from lowbit.formats import IntFormat
from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear
from lowbit.quantize import QuantizeConfig, quantize
from support import EVAL_TEXT, needs_eval_text, assert_one_line_error, run_cli

SMALL = ["--bits", "4", "--group", "32", "--samples", "4", "--seq-len", "64"]



@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir", "tiny_qwen2_dir"])
def test_calibrated_quantize_saves_and_evaluates(request, capsys, tmp_path, calib, arch, method):
    src = request.getfixturevalue(arch)
    out = tmp_path / "q"
    extra = ["--act-order", "--save-plan", tmp_path / "plan"] if method == "awq+gptq" else []
    code, stdout, err = run_cli(capsys, "quantize", src, "--method", method, *SMALL, "--asym", "--calib", calib,
                                "--out", out, "--json", tmp_path / "s.json", *extra)
    assert code == 0, err
    assert "saved to" in stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["method"]["method"] == method
    assert manifest["method"]["calibration"]["samples"] == 4
    assert manifest["method"]["walk"] == ("sequential" if method == "gptq" else "two-pass")
    assert manifest["method"]["calibration"]["text_sha256"]
    assert ("gptq" in manifest["method"]) == ("gptq" in method) and ("awq" in manifest["method"]) == ("awq" in method)
    summary = json.loads((tmp_path / "s.json").read_text())
    losses = list(summary["proxy_loss"].values())
    assert len(losses) == 14 and sum(a for a, _ in losses) < sum(b for _, b in losses)  # beats RTN overall
    if method == "awq+gptq":
        assert manifest["method"]["gptq"]["act_order"] is True
        assert (tmp_path / "plan" / "plan.json").is_file()
    code, stdout, err = run_cli(capsys, "eval", out, "--text", calib, "--ctx", 64, "--windows", 2)
    assert code == 0, err


@pytest.mark.parametrize("flags, clip, duo, sweeps", [([], True, True, 1), (["--clip", "none", "--no-duo"], False, False, 1),
                                                      (["--clip-sweeps", "0"], True, True, 0)])
def test_awq_defaults_to_its_clip_search(capsys, tiny_llama_dir, tmp_path, calib, flags, clip, duo, sweeps):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "awq", *SMALL, "--calib", calib,
                           "--out", out, "--save-plan", tmp_path / "plan", *flags)
    assert code == 0, err
    awq = json.loads((out / "lowbit.json").read_text())["method"]["awq"]
    assert (awq["clip"], awq["duo"], awq["clip_sweeps"]) == (clip, duo, sweeps)
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert bool(plan.get("clips")) == clip, plan.keys()


def test_composition_is_configuration(tiny_llama_dir, calib):
    """awq+gptq = the AWQ step (same plan as awq alone on layer 0) followed by GPTQ."""
    from lowbit.data.text import read_text
    from lowbit.quantize import calibration_samples

    results = {}
    for method in ("awq", "awq+gptq"):
        loaded = load(str(tiny_llama_dir))
        config = QuantizeConfig(fmt=IntFormat(4, True, 32), method=method, calib=CalibConfig(4, 64))
        samples = calibration_samples(loaded, read_text(calib), config.calib)
        results[method] = quantize(loaded, config, samples, progress=False)
        assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    a, b = results["awq"].plan.scales[0], results["awq+gptq"].plan.scales[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sink_weight_counts_each_samples_first_position(tiny_gemma3_dir):
    """H with sink weight w = plain H + (w - 1) x H of one-token runs of the first tokens."""
    from lowbit.calibration.walker import walk

    loaded = load(str(tiny_gemma3_dir))
    spec = loaded.spec
    samples = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))

    def hessians(ids, w):
        got = {}
        walk(loaded.model, spec, ids, lambda i, layer, st: got.update({i: st}), {"hessian"}, progress=False,
             sink_weight=w)
        return got

    plain, weighted, first = hessians(samples, 1.0), hessians(samples, 7.0), hessians(samples[:, :1], 1.0)
    for i in plain:
        for name in spec.linears:
            want = plain[i][name].hessian + 6.0 * first[i][name].hessian
            got = weighted[i][name].hessian
            assert not torch.allclose(got, plain[i][name].hessian)
            # batched vs one-token float32 forwards differ in rounding: bound relative to H's scale
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sink_weight_validated_and_recorded():
    with pytest.raises(ValueError, match="sink weight"):
        QuantizeConfig(fmt=IntFormat(4, True, 32), method="gptq", sink_weight=-1.0)
    d = QuantizeConfig(fmt=IntFormat(4, True, 32), method="gptq", sink_weight=1.0).to_dict()
    assert d["sink_weight"] == 1.0 and "awq" not in d and d["gptq"]["act_order"] is False


def test_calib_required(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--calib")
    assert not (tmp_path / "o").exists()


def test_unknown_method_lists_known(capsys, tiny_llama_dir, tmp_path, calib):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "spqr", "--calib", calib,
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "spqr", "rtn, imatrix, gptq, awq, awq+gptq")
    assert not (tmp_path / "o").exists()


def test_calibration_text_too_short(capsys, tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "awq", *SMALL, "--calib", short,
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "short.txt", "--seq-len 64")
    assert not (tmp_path / "o").exists()


def test_seq_len_beyond_context(capsys, tiny_llama_dir, tmp_path, calib):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--calib", calib,
                           "--out", tmp_path / "o")  # default --seq-len 2048 > 256 positions
    assert_one_line_error(code, err, "--seq-len 2048", "256")


def test_nan_in_a_layer_is_named(capsys, tiny_llama_dir, tmp_path, calib):
    loaded = load(str(tiny_llama_dir))
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    bad = tmp_path / "bad"
    loaded.model.save_pretrained(bad)
    loaded.tokenizer.save_pretrained(bad)
    for method in ("gptq", "awq"):
        code, _, err = run_cli(capsys, "quantize", bad, "--method", method, *SMALL, "--calib", calib,
                               "--out", tmp_path / "o")
        assert_one_line_error(code, err, "layer 1")
        assert not (tmp_path / "o").exists()


def test_walk_choice_validated_and_recorded(capsys, monkeypatch, tiny_llama_dir, tmp_path, calib):
    with pytest.raises(ValueError, match="two-pass"):
        QuantizeConfig(fmt=IntFormat(4, True, 32), method="awq+gptq", walk="sequential")
    import lowbit.quantize as q

    dims, samples = load(str(tiny_llama_dir)).dims, torch.zeros(4, 64, dtype=torch.long)
    config = QuantizeConfig(fmt=IntFormat(4, True, 32), method="gptq")
    assert q.choose_walk(config, dims, samples) == "sequential"
    assert q.choose_walk(config, dims, samples, tmp_path) == "two-pass"        # auto: offload needs two passes
    assert q.choose_walk(QuantizeConfig(fmt=IntFormat(4, True, 32), method="awq"), dims, samples) == "two-pass"
    need = samples.numel() * 4 * (dims.intermediate + 4 * dims.hidden)
    monkeypatch.setattr(q, "available_memory", lambda: 3 * need)             # would take a third: too much
    assert q.choose_walk(config, dims, samples) == "two-pass"
    assert q.choose_walk(QuantizeConfig(fmt=IntFormat(4, True, 32), method="gptq", walk="sequential"),
                         dims, samples) == "sequential"
    monkeypatch.undo()
    assert q.available_memory() > 0
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", *SMALL, "--calib", calib,
                           "--walk", "sequential", "--offload", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--offload")
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", *SMALL, "--calib", calib,
                           "--walk", "two-pass", "--out", tmp_path / "q")
    assert code == 0, err
    assert json.loads((tmp_path / "q" / "lowbit.json").read_text())["method"]["walk"] == "two-pass"


@needs_eval_text
def test_eval_text_refused(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", *SMALL, "--calib", EVAL_TEXT,
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--allow-eval-text")
    assert not (tmp_path / "o").exists()


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--calib", "default: 128", "default: 2048", "default: 0.01", "awq+gptq"):
        assert needle in text
