"""Fixtures shared by the KV-cache tests (imported by name: a conftest.py here would shadow tests/conftest.py, which other tests import)."""
from __future__ import annotations

import pytest

from lowbit.models.load import load


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The tiny Llama in float64 (so no rounding flips between paths that should agree)."""
    loaded = load(str(tiny_llama_dir))
    loaded.model.double()
    return loaded


@pytest.fixture()
def text(tmp_path):
    """A small UTF-8 text, long enough for a few windows of the tiny models."""
    path = tmp_path / "t.txt"
    path.write_text("the cat sat on the mat and the dog ate the bone " * 120)
    return path
