"""The same command gives the same bytes: RTN, GPTQ and AWQ quantize a tiny model twice into the same
directory and every file of the two results is byte-identical; the manifest records what reproduces it."""
from __future__ import annotations

import json

import pytest

from support import dir_bytes, run_cli



@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_the_same_command_writes_the_same_bytes(tiny_llama_dir, calib, tmp_path, capsys, method):
    out = tmp_path / "q"
    argv = ["quantize", tiny_llama_dir, "--method", method, "--bits", "4", "--group", "32", "--out", out]
    if method != "rtn":
        argv += ["--calib", calib, "--samples", "4", "--seq-len", "32", "--seed", "3"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    first = dir_bytes(out)
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert dir_bytes(out) == first
    manifest = json.loads(first["lowbit.json"])
    assert manifest["method"]["command"].startswith(f"lowbit quantize {tiny_llama_dir} --method {method}")
    assert "--overwrite" not in manifest["method"]["command"]
    assert {"torch", "transformers", "python"} <= set(manifest["versions"]) and manifest["lowbit"]
    if method != "rtn":
        assert manifest["method"]["calibration"]["seed"] == 3
        assert len(manifest["method"]["calibration"]["text_sha256"]) == 64
