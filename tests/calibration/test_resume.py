"""Resume after a crash with the same bytes: a run interrupted after a finished layer continues with
--resume and writes a directory byte-identical to an uninterrupted run's; a checkpoint of another
run is refused naming the difference; the real-model case sends SIGKILL to a running process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from support import CALIB_TEXT, assert_one_line_error, dir_bytes, run_cli

from lowbit.calibration import resume as resume_mod
from lowbit.calibration.resume import STATE, checkpoint_dir, first_difference



class Crash(Exception):
    pass


def _crash_after(monkeypatch, layer: int):
    """Make the run die right after checkpointing `layer` (the state a kill between layers leaves)."""
    original = resume_mod.Checkpoint.layer_done

    def layer_done(self, index, module, outputs):
        original(self, index, module, outputs)
        if index == layer:
            raise Crash(f"killed after layer {index}")

    monkeypatch.setattr(resume_mod.Checkpoint, "layer_done", layer_done)


@pytest.mark.parametrize("method,walk,lazy", [("gptq", "sequential", False), ("gptq", "two-pass", False),
                                              ("awq", "two-pass", False), ("gptq", "sequential", True)])
def test_resumed_run_writes_the_same_bytes(tiny_llama_dir, calib, tmp_path, capsys, monkeypatch, method, walk, lazy):
    """lazy: the finished layers go from the checkpoint to the output stream one at a time."""
    base = ["quantize", tiny_llama_dir, "--method", method, "--bits", "4", "--group", "32", "--calib", calib,
            "--samples", "4", "--seq-len", "32", "--walk", walk] + (["--lazy"] if lazy else [])
    out = tmp_path / "q"                                   # the same --out: lowbit.json records the command
    code, _, err = run_cli(capsys, *base, "--out", out)
    assert code == 0, err
    assert not checkpoint_dir(out).exists()                          # removed once the output is written
    whole = dir_bytes(out)
    shutil.rmtree(out)
    with monkeypatch.context() as m:
        _crash_after(m, 0)
        with pytest.raises(Crash):
            run_cli(capsys, *base, "--out", out)
    ckpt = checkpoint_dir(out)
    assert json.loads((ckpt / STATE).read_text())["finished"] == 1 and not out.exists()
    code, _, err = run_cli(capsys, *base, "--out", out)                     # a fresh run would lose it: refused
    assert_one_line_error(code, err, "--resume", str(ckpt))
    code, _, err = run_cli(capsys, *base, "--out", out, "--resume")
    assert code == 0, err
    assert dir_bytes(out) == whole
    assert not ckpt.exists()


def test_resume_refuses_another_runs_checkpoint(tiny_llama_dir, calib, tmp_path, capsys, monkeypatch):
    base = ["quantize", tiny_llama_dir, "--method", "gptq", "--group", "32", "--calib", calib,
            "--samples", "4", "--seq-len", "32", "--out", tmp_path / "q"]
    with monkeypatch.context() as m:
        _crash_after(m, 0)
        with pytest.raises(Crash):
            run_cli(capsys, *base, "--bits", "4")
    before = dir_bytes(checkpoint_dir(tmp_path / "q"))
    code, _, err = run_cli(capsys, *base, "--bits", "3", "--resume")
    assert_one_line_error(code, err, "another run", "bits: 3 here, 4 in the checkpoint")
    code, _, err = run_cli(capsys, *base, "--bits", "4", "--samples", "5", "--resume")
    assert_one_line_error(code, err, "another run", "samples")
    assert dir_bytes(checkpoint_dir(tmp_path / "q")) == before             # nothing overwritten


def test_resume_bad_input(tiny_llama_dir, calib, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--bits", "4", "--out", tmp_path / "a", "--resume")
    assert_one_line_error(code, err, "--resume", "rtn")
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--calib", calib, "--samples", "2",
                           "--seq-len", "16", "--out", tmp_path / "b", "--resume")
    assert_one_line_error(code, err, "no checkpoint")
    assert not (tmp_path / "b").exists()


def test_first_difference_names_the_key_path():
    assert first_difference({"a": {"b": 1, "c": [1]}}, {"a": {"b": 1, "c": [1]}}) is None
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 2}}) == "a.b: 1 here, 2 in the checkpoint"
    assert first_difference({"a": 1}, {}) == "a: 1 here, absent in the checkpoint"


def _lowbit(*argv) -> list[str]:
    return [sys.executable, "-m", "lowbit", *map(str, argv)]


@pytest.mark.real_model
def test_kill_9_then_resume_is_byte_identical_on_smollm2(tmp_path):
    """SIGKILL a real SmolLM2 GPTQ run during layer k (k >= 3 finished), then --resume: the same bytes."""
    argv = ["-q", "quantize", "smollm2-135m", "--method", "gptq", "--bits", "4", "--group", "128", "--calib",
            CALIB_TEXT, "--samples", "4", "--seq-len", "256"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = tmp_path / "q"                                   # the same --out: lowbit.json records the command
    done = subprocess.run(_lowbit(*argv, "--out", out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = dir_bytes(out)
    shutil.rmtree(out)
    state = checkpoint_dir(out) / STATE
    proc = subprocess.Popen(_lowbit(*argv, "--out", out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["finished"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)                                   # during layer 3 or later
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    finished = json.loads(state.read_text())["finished"]
    assert 3 <= finished < 30
    resumed = subprocess.run(_lowbit(*argv, "--out", out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert dir_bytes(out) == whole
