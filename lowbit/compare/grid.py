"""`lowbit compare`'s grid: which cells (method × format, or a recipe) run, how each is keyed on disk so an
interrupted compare resumes and a wider one only runs what is new, and one cell's run.

A cell is `lowbit quantize MODEL --method M --plan <uniform plan of F>` (or `--recipe R`) in this
process, written to a temporary directory, loaded back and scored against the shared float model —
the same path a user's own command takes, so each point's command is the command to reproduce it.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError

DEFAULT_METHODS = ("rtn", "gptq", "awq")
# 2 to 4 bits, where methods differ; at 8 bits every method is near lossless (KLD 0.001 on SmolLM2 for all
# three) and its three cells cost a sixth of the grid's time: add int8-g128-sym-signed to --formats for it
DEFAULT_FORMATS = ("int2-g64-sym-signed", "int3-g64-sym-signed", "int4-g128-sym-signed", "int4-g64-sym-signed",
                   "nf4-g64")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a method and a format, or a recipe."""

    method: str | None = None
    format: str | None = None
    recipe: str | None = None

    @property
    def label(self) -> str:
        return f"recipe {self.recipe}" if self.recipe else f"{self.method} {self.format}"

    @property
    def calibrated(self) -> bool:
        from ..quantize import CALIBRATED

        return bool(self.recipe) or self.method in CALIBRATED

    def flags(self, plan_file: Path) -> list[str]:
        """The quantize flags (a uniform plan file for the format)."""
        if self.recipe:
            return ["--recipe", self.recipe]
        return ["--method", self.method, "--plan", str(plan_file)]

    def command(self, model: str, calib: str, samples: int, seq_len: int) -> str:
        """What a user runs to reproduce this point (the format written as flags where it is uniform)."""
        what = f"--recipe {self.recipe}" if self.recipe else f"--method {self.method} --plan {self.format}.json"
        cal = f" --calib {calib} --samples {samples} --seq-len {seq_len}" if self.calibrated else ""
        return f"lowbit quantize {model} {what}{cal} --out DIR"


def grid(methods: list[str], formats: list[str], recipes: list[str]) -> list[Cell]:
    """Cells of methods × formats plus recipes; LowbitError for an unknown method, format or recipe."""
    from ..formats import format_from_name
    from ..quantize import METHODS
    from ..recipes import load_recipe

    for m in methods:
        if m not in METHODS:
            raise LowbitError(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
    for f in formats:
        try:
            format_from_name(f)
        except ValueError as e:
            raise LowbitError(f"--formats: {e}") from None
    for r in recipes:
        try:
            load_recipe(r)
        except ValueError as e:
            raise LowbitError(f"--recipes: {str(e).splitlines()[0]}") from None
    cells = [Cell(method=m, format=f) for m in methods for f in formats] + [Cell(recipe=r) for r in recipes]
    if not cells:
        raise LowbitError("the grid is empty: give --methods and --formats, or --recipes")
    return cells


def cell_key(cell: Cell, identity: dict) -> str:
    """A cell's cache key: the cell and everything its number depends on (model, texts, settings)."""
    from .. import __version__

    recipe_text = None
    if cell.recipe:
        path = Path(cell.recipe)
        recipe_text = path.read_text() if path.is_file() else cell.recipe      # a built-in by name
    payload = {"cell": [cell.method, cell.format, cell.recipe, recipe_text], "identity": identity,
               "lowbit": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def run_cell(cell: Cell, model_arg: str, calib_flags: list[str], plans: Path, score) -> dict:
    """Quantize one cell into a temporary directory (the CLI's own path) and score it with score(loaded)."""
    from ..cli.main import main
    from ..models.load import load

    plan = plans / f"{cell.format}.json"
    if cell.format and not plan.exists():
        plan.write_text(json.dumps({"default": cell.format}) + "\n")
    with tempfile.TemporaryDirectory(prefix="lowbit-compare-") as tmp:
        out, summary = Path(tmp) / "q", Path(tmp) / "q.json"
        argv = ["-q", "quantize", model_arg, *cell.flags(plan), *(calib_flags if cell.calibrated else []),
                "--out", str(out), "--json", str(summary)]
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        if code != 0:
            return {"error": (err.getvalue().strip().splitlines() or [f"exit {code}"])[-1].removeprefix("lowbit: error: ")}
        quantized = json.loads(summary.read_text())
        result = score(load(str(out)))
    return {"bits_per_weight": quantized["bits_per_weight"], "quantize_seconds": quantized["seconds"], **result}
