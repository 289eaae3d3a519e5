"""Bad input gives one clear line on stderr and a non-zero exit; good input works end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import assert_one_line_error, run_cli



def test_unknown_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "no-such-model", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no-such-model", "smollm2-135m", "gemma3-270m")
    assert not (tmp_path / "o").exists()


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", tmp_path / "missing.gguf")
    assert_one_line_error(code, err, "missing.gguf")


def test_missing_text(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", tmp_path / "nope.txt")
    assert_one_line_error(code, err, "nope.txt", "not found")


def test_ctx_beyond_context(capsys, tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", 4096)
    assert_one_line_error(code, err, "--ctx 4096", "256")


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(capsys, tiny_llama_dir, tmp_path, bits):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--bits", bits, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "bits")
    assert not (tmp_path / "o").exists()


def test_asym_where_unsupported(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--format", "nf4", "--group", 0, "--asym",
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--asym")


@pytest.mark.parametrize("flags", [["--format", "nf4"], ["--asym"]])
def test_scale_rule_where_unsupported(capsys, tiny_llama_dir, tmp_path, flags):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, *flags, "--scale-rule", "absmax_half",
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--scale-rule absmax_half")
    assert not (tmp_path / "o").exists()


def test_scale_rule_signed_uses_every_code(capsys, tiny_llama_dir, tmp_path):
    """2-bit symmetric: the default grid has 3 codes (-1, 0, 1); signed adds -2, and the saved
    format says so, so the directory reloads to the same grid."""
    from lowbit.models.load import load

    used = {}
    for rule in ("absmax", "signed"):
        out = tmp_path / rule
        code, stdout, _ = run_cli(capsys, "quantize", tiny_llama_dir, "--bits", 2, "--group", 32,
                                  "--scale-rule", rule, "--out", out)
        assert code == 0
        manifest = json.loads((out / "lowbit.json").read_text())
        formats = {json.dumps(e["format"], sort_keys=True) for e in manifest["tensors"].values()}
        assert [json.loads(f)["scale_rule"] for f in formats] == [rule]
        model = load(str(out)).model
        linear = model.model.layers[0].mlp.down_proj
        used[rule] = set(linear.codes.unique().tolist())
    assert used["absmax"] == {1, 2, 3}          # stored u = c + 2: c in {-1, 0, 1}
    assert used["signed"] == {0, 1, 2, 3}        # c = -2 too


def test_out_is_a_file(capsys, tiny_llama_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--out", tmp_path / "f")
    assert_one_line_error(code, err, "is a file")


def test_corrupted_safetensors(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_llama_dir, "--bits", 4, "--group", 32, "--out", out)[0] == 0
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])            # truncated mid-tensor
    code, _, err = run_cli(capsys, "eval", out, "--text", tmp_path / "missing.txt")
    assert_one_line_error(code, err)                        # text checked first: still one line
    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    code, _, err = run_cli(capsys, "eval", out, "--text", text, "--ctx", 64)
    assert_one_line_error(code, err, "model.safetensors")


def test_quantize_eval_info_end_to_end(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, _ = run_cli(capsys, "quantize", tiny_llama_dir, "--bits", 4, "--group", 64, "--asym",
                              "--clip", "mse", "--out", out)
    assert code == 0 and "int4-g64-asym" in stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["source"]["kind"] == "hf" and len(manifest["tensors"]) == 2 * 7
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, stdout, _ = run_cli(capsys, "eval", out, "--text", text, "--ctx", 128, "--json", tmp_path / "r.json")
    assert code == 0
    record = json.loads((tmp_path / "r.json").read_text())
    for key in ("ppl", "nll", "tokens", "ctx", "windows", "kld", "bits_per_weight", "model", "text",
                "convention", "seconds"):
        assert key in record
    assert record["kld"]["mean"] > 0 and record["windows"] == record["tokens"] // 128
    # hidden 96 with g64: ragged groups of 64 + 32 → fp16 scale + 4-bit zero per group
    assert 4.25 < record["bits_per_weight"] < 4.9
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "int4-g64-asym" in stdout


def test_console_script_reports_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "nope", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "lowbit: error: model 'nope' not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lowbit", "--debug", "quantize", "nope", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
