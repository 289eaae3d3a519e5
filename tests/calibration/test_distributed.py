"""Calibration in two processes (torch.distributed, gloo): the shares cover the samples once, and
`--workers 2` writes the same directory as one process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import assert_one_line_error, dir_bytes, run_cli

from lowbit.calibration.distributed import Workers



@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (5, 3), (3, 3)])
def test_shares_cover_every_sample_once(n, world):
    taken = [i for r in range(world) for i in range(n)[Workers(r, world).share(n)]]
    assert taken == list(range(n))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_two_gloo_processes_write_the_same_bytes_as_one(tiny_llama_dir, calib, tmp_path, method):
    """Each rank runs one thread (--workers gives each rank cores // N), so the single process runs one
    thread too: float32 matmuls round differently with another thread count, which alone changes codes.
    The ranks add their shares' Hessians and then the shares, a different order of float64 additions
    than one process's; on these inputs the sums, the codes and so the files are identical."""
    argv = ["quantize", tiny_llama_dir, "--method", method, "--bits", "4", "--group", "32", "--calib", calib,
            "--samples", "6", "--seq-len", "32"]
    out = tmp_path / "q"                                   # the same --out: lowbit.json records the command
    one = subprocess.run([sys.executable, "-m", "lowbit", "-q", *map(str, argv), "--out", out],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr
    single = dir_bytes(out)
    two = subprocess.run([sys.executable, "-m", "lowbit", "-q", *map(str, argv), "--out", out, "--overwrite",
                          "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert dir_bytes(out) == single


def test_workers_bad_input(tiny_llama_dir, calib, tmp_path, capsys):
    base = ["quantize", tiny_llama_dir, "--bits", "4", "--out", tmp_path / "q"]
    code, _, err = run_cli(capsys, *base, "--workers", "2")
    assert_one_line_error(code, err, "--workers", "rtn")
    code, _, err = run_cli(capsys, *base, "--method", "gptq", "--calib", calib, "--samples", "2", "--workers", "3")
    assert_one_line_error(code, err, "--workers 3", "2 calibration samples")
    code, _, err = run_cli(capsys, *base, "--method", "gptq", "--calib", calib, "--workers", "0")
    assert_one_line_error(code, err, "--workers")
    assert not (tmp_path / "q").exists()
