"""Text sources: a file path, or a Hugging Face dataset name when online."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError

# Texts that lowbit evaluates on, by sha256: calibrating on them is refused by default.
EVAL_TEXTS = {
    "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83": "WikiText-2 raw test",
}


@dataclass(frozen=True)
class Text:
    """A text and where it came from (path or dataset name) with its sha256."""

    text: str
    origin: str
    sha256: str

    @property
    def is_eval_text(self) -> bool:
        return self.sha256 in EVAL_TEXTS


def _from_dataset(name: str) -> str:
    """`name` as 'dataset[/config][:split]', rows joined with blank lines (the GPTQ convention)."""
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"text {name!r} is not a file; reading it as a Hugging Face dataset needs the "
                          "`datasets` package and network access: pass a file path instead") from None
    dataset, _, split = name.partition(":")
    path, _, config = dataset.partition("/")
    try:
        rows = datasets.load_dataset(path, config or None, split=split or "test")
    except Exception as e:  # offline, unknown dataset, missing split: all one line for the user
        raise LowbitError(f"text {name!r} is not a file and could not be loaded as a Hugging Face "
                          f"dataset ({type(e).__name__}); offline, pass a file path") from None
    column = "text" if "text" in rows.column_names else rows.column_names[0]
    return "\n\n".join(rows[column])


def read_text(arg: str | Path) -> Text:
    """Read a text file (UTF-8) or, when `arg` is no file, a Hugging Face dataset."""
    path = Path(arg).expanduser()
    if path.is_dir():
        raise LowbitError(f"text {arg} is a directory, not a text file")
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LowbitError(f"cannot read text {arg}: {e}") from None
        origin = str(path.resolve())
    elif "/" in str(arg) and not str(arg).startswith((".", "/", "~")) and not path.suffix:
        text, origin = _from_dataset(str(arg)), f"hf:{arg}"
    else:
        raise LowbitError(f"text file {arg} not found")
    if not text.strip():
        raise LowbitError(f"text {arg} is empty")
    return Text(text, origin, hashlib.sha256(text.encode("utf-8")).hexdigest())
