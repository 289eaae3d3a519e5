"""Calibration samples are seeded, in range, and never drawn from the evaluation text by default."""
from __future__ import annotations

import hashlib

import pytest
import torch

from lowbit.data.calibration import CalibConfig, sample_calibration
from lowbit.data.text import Text, read_text
from lowbit.errors import LowbitError

from support import EVAL_TEXT, needs_eval_text


def _text(s: str) -> Text:
    return Text(s, "mem", hashlib.sha256(s.encode()).hexdigest())


def test_seeded_and_contiguous():
    ids = torch.arange(1000)
    a = sample_calibration(ids, _text("x"), CalibConfig(samples=8, seq_len=32, seed=3))
    b = sample_calibration(ids, _text("x"), CalibConfig(samples=8, seq_len=32, seed=3))
    c = sample_calibration(ids, _text("x"), CalibConfig(samples=8, seq_len=32, seed=4))
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)           # each sample is a contiguous run
    state = torch.random.get_rng_state()
    sample_calibration(ids, _text("x"), CalibConfig(samples=2, seq_len=8))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_too_short():
    with pytest.raises(LowbitError, match="fewer than --seq-len"):
        sample_calibration(torch.arange(10), _text("x"), CalibConfig(samples=1, seq_len=32))


@needs_eval_text
def test_refuses_eval_text():
    text = read_text(EVAL_TEXT)
    assert text.is_eval_text
    with pytest.raises(LowbitError, match="evaluation text"):
        sample_calibration(torch.arange(5000), text, CalibConfig(samples=1, seq_len=32))
    out = sample_calibration(torch.arange(5000), text, CalibConfig(samples=1, seq_len=32, allow_eval_text=True))
    assert out.shape == (1, 32)


def test_text_errors(tmp_path):
    with pytest.raises(LowbitError, match="not found"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LowbitError, match="empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(LowbitError, match="Hugging Face"):
        read_text("wikitext/wikitext-2-raw-v1:test")         # offline: one clear line
