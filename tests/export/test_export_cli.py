"""`lowbit export`: per-format flags, refusals as one line, atomic output, the plain HF target."""
from __future__ import annotations

import json
import os

import pytest
import torch
from export_support import quantized_dir

from lowbit.cli.main import main
from lowbit.export.registry import Flag, Target, all_flags, check_flags, targets
from lowbit.models.load import load


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, tmp_path_factory):
    return quantized_dir(tiny_llama_dir, tmp_path_factory.mktemp("export") / "q", 4, 32, False)


def test_flag_of_another_format_is_one_line(capsys, quantized, tmp_path):
    code, _, err = run(capsys, "export", quantized, "--format", "gptq", "--dtype", "float16", "--out", tmp_path / "o")
    assert code == 2
    assert "--dtype is a flag of --format hf, not of --format gptq" in _error(err)
    assert not (tmp_path / "o").exists()


def test_flags_are_validated_per_target():
    noop = lambda *a: None
    registered = {"a": Target("a", "", "model", noop, (Flag("--type", "q4"),)),
                  "b": Target("b", "", "model", noop, (Flag("--type", "q4"), Flag("--calib"))),
                  "c": Target("c", "", "model", noop)}
    assert {o: owners for o, (_, owners) in all_flags(registered).items()} == {"--type": ["a", "b"], "--calib": ["b"]}
    check_flags(registered["b"], {"type": "q8", "calib": "x"}, registered)          # both are b's own
    assert registered["a"].options({}) == {"type": "q4"}
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="--calib is a flag of --format b, not of --format a"):
        check_flags(registered["a"], {"calib": "x"}, registered)
    with pytest.raises(ValueError, match="declare --type differently"):
        all_flags({**registered, "d": Target("d", "", "model", noop, (Flag("--type", "q8"),))})
    assert set(targets()) >= {"hf", "compressed-tensors", "gptq"}


def test_engine_formats_need_a_lowbit_directory(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run(capsys, "export", tiny_llama_dir, "--format", "compressed-tensors", "--out", tmp_path / "o")
    assert code == 2
    assert "exports a lowbit quantized directory" in _error(err) and "is a hf model" in err


def test_existing_out_needs_overwrite(capsys, quantized, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "export", quantized, "--format", "compressed-tensors", "--out", out)
    assert code == 2 and "already exists" in _error(err)
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run(capsys, "export", quantized, "--format", "compressed-tensors", "--out", out, "--overwrite")
    assert code == 0 and "int4 asym group 32" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]                       # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask                      # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_export_leaves_nothing(quantized, tmp_path, monkeypatch):
    import safetensors.torch

    from lowbit.export.registry import export

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    target = targets()["gptq"]
    with pytest.raises(KeyboardInterrupt):
        export(target, str(quantized), tmp_path / "o", False, target.options({}))
    assert list(tmp_path.iterdir()) == []


def test_hf_export_of_quantized_dir_is_its_w_dq(capsys, quantized, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    code, stdout, _ = run(capsys, "export", quantized, "--format", "hf", "--out", out)
    assert code == 0 and "14 quantized linears written as their de-quantized weights" in stdout
    assert (out / "generation_config.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    lowbit_model = load(str(quantized))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, lowbit_model.model(input_ids=ids).logits)
    text = "héllo wörld, 123"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == lowbit_model.tokenizer(text)["input_ids"]
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()   # still tied


def test_hf_export_dtype(capsys, tiny_gemma3_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf16"
    code, _, _ = run(capsys, "export", tiny_gemma3_dir, "--format", "hf", "--dtype", "bfloat16", "--out", out)
    assert code == 0
    stored = load_file(str(out / "model.safetensors"))
    source = load(str(tiny_gemma3_dir)).model.state_dict()
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(stored[k], source[k].to(torch.bfloat16)) for k in stored)
