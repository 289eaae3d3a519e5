"""`lowbit eval --kv` and `lowbit generate`: runs on a tiny model, one clear line on bad input."""
from __future__ import annotations

import json

import pytest

from support import run_cli
from kv_fixtures import text  # noqa: F401  (pytest fixtures)


def test_eval_with_a_quantized_cache_states_its_convention(capsys, tiny_llama_dir, text, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "2",
                                "--kv", "kivi", "--kv-bits", "2", "--kv-group", "8", "--kv-residual", "16",
                                "--kv-sink", "4", "--json", out)
    assert code == 0, err
    assert "kv cache: KV cache kivi2-g8-sink4-r16" in stdout
    assert "except the first 4 tokens of each window and the newest 16 tokens kept in float" in stdout
    record = json.loads(out.read_text())
    assert record["kv_cache"]["method"] == "kivi" and record["kv_cache"]["residual"] == 16
    assert record["kv_cache"]["sink"] == 4
    code, stdout16, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "2",
                                  "--kv", "int", "--kv-bits", "16")
    assert code == 0 and "kv cache" not in stdout16                           # 16 bits: the float cache


def test_generate_prints_text_speed_and_bytes(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "g.json"
    code, stdout, err = run_cli(capsys, "generate", tiny_llama_dir, "--prompt", "the cat sat", "--max-new-tokens",
                                "6", "--kv", "turboquant", "--kv-bits", "3", "--json", out)
    assert code == 0, err
    assert "cache bytes/token" in stdout and "turboquant3" in stdout
    record = json.loads(out.read_text())
    head_dim, kv_heads, layers = 24, 2, 2
    per_token = 2 * layers * kv_heads * (head_dim * 3 / 8 + 2)                # codes + float16 norm, K and V
    assert record["cache_bytes_per_token"] == pytest.approx(per_token)
    code, again, _ = run_cli(capsys, "generate", tiny_llama_dir, "--prompt", "the cat sat", "--max-new-tokens", "6",
                             "--kv", "turboquant", "--kv-bits", "3", "--json", out)
    assert json.loads(out.read_text())["tokens"] == record["tokens"]           # deterministic


@pytest.mark.parametrize("flags, needle", [
    (["--kv", "int", "--kv-bits", "5"], "supports --kv-bits 2, 3, 4, 8"),
    (["--kv", "turboquant", "--kv-bits", "1.5"], "supports --kv-bits"),
    (["--kv-bits", "4"], "--kv-bits needs --kv"),
    (["--kv", "int"], "needs --kv-bits"),
    (["--kv", "kivi", "--kv-bits", "2", "--kv-residual", "100"], "larger than the context"),
    (["--kv", "turboquant", "--kv-bits", "3", "--kv-sink", "65"], "--kv-sink 65 is larger than the context"),
    (["--kv", "turboquant", "--kv-bits", "3", "--kv-sink", "-1"], "KV sink must be an integer >= 0"),
    (["--kv", "turboquant", "--kv-bits", "3", "--kv-seed", "x"], "--kv-seed must be an integer"),
    (["--kv", "int", "--kv-bits", "4", "--kv-group", "7"], "not a multiple of the KV group"),
    (["--kv", "kivi", "--kv-bits", "2", "--kv-center-k"], "--kv-center-k (center_k) applies to per-token K"),
    (["--kv", "int", "--kv-bits", "4", "--kv-norm-correct"], "--kv-norm-correct (norm_correct) applies to --kv turboquant")])
def test_bad_kv_flags_are_one_line(capsys, tiny_llama_dir, text, flags, needle):
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "1", *flags)
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1


def test_kv_on_a_model_that_already_quantizes_its_cache_is_refused(capsys, tiny_llama_dir, calib, text, tmp_path):
    q, recipe = tmp_path / "q", tmp_path / "kv.yaml"
    recipe.write_text("steps:\n  - rtn: {}\nweights: {default: int8-ch-sym}\n"
                      "kv_cache: {k: a4-token-sym, v: a4-token-sym}\n")
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--recipe", recipe, "--calib", calib,
                           "--samples", "4", "--seq-len", "64", "--out", q)
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", q, "--text", text, "--ctx", "64", "--windows", "1", "--kv", "int",
                           "--kv-bits", "4")
    assert code != 0 and "already quantizes its KV cache" in err
