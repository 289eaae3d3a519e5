"""Export targets: one module per engine format, registered by name, written atomically.

A target is a `Target` (name, what SRC it takes, its own command-line flags, a writer). The
writer gets the source argument, a fresh empty directory and the values of its own flags, and
fills the directory; `export()` does the rest (refusing an existing OUT, the temporary
directory, the rename). Adding a format is one module with a `TARGET` plus one entry in
TARGET_MODULES; no other target changes.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LowbitError

# lowbit.export.<module> for each target, in the order `lowbit export --help` lists them
TARGET_MODULES = ("hf", "compressed_tensors", "gptq", "gguf")
SOURCES = ("model", "quantized")
OUTPUTS = ("dir", "file")  # what OUT is: a directory the writer fills, or one file the writer creates


@dataclass(frozen=True)
class Flag:
    """One format-specific command-line flag: argparse's add_argument(option, **kwargs).

    `kwargs` must not set `dest` or `default`: the value the writer sees when the flag is not
    given is `default` here, so the parser can tell a flag given from a flag left out.
    """

    option: str
    default: object = None
    kwargs: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.option.startswith("--") or len(self.option) < 3:
            raise ValueError(f"Flag.option must look like --name, got {self.option!r}")
        if {"dest", "default"} & set(self.kwargs):
            raise ValueError(f"Flag {self.option}: kwargs must not set dest or default")

    @property
    def dest(self) -> str:
        return self.option[2:].replace("-", "_")


@dataclass(frozen=True)
class ExportReport:
    """What a writer tells the user: one line per fact, plus notes (e.g. an exact re-expression)."""

    facts: Mapping[str, object]
    notes: tuple[str, ...] = ()


Writer = Callable[[str, Path, Mapping[str, object]], ExportReport]


@dataclass(frozen=True)
class Target:
    """An export format. `source`: "model" (any model argument) or "quantized" (a lowbit directory).
    `output`: "dir" (the writer fills a fresh directory) or "file" (the writer creates the file it is given)."""

    name: str
    summary: str
    source: str
    write: Writer
    flags: tuple[Flag, ...] = ()
    output: str = "dir"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"Target.source must be one of {SOURCES}, got {self.source!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"Target.output must be one of {OUTPUTS}, got {self.output!r}")
        options = [f.option for f in self.flags]
        if len(set(options)) != len(options):
            raise ValueError(f"Target {self.name}: a flag is declared twice in {options}")

    def options(self, given: Mapping[str, object]) -> dict[str, object]:
        """The writer's options: the given values of this target's flags, defaults for the rest."""
        return {f.dest: given.get(f.dest, f.default) for f in self.flags}


def targets() -> dict[str, Target]:
    """Every registered target by name (imports the target modules; they import torch lazily)."""
    found = {}
    for module in TARGET_MODULES:
        target = importlib.import_module(f"{__package__}.{module}").TARGET
        if target.name in found:
            raise ValueError(f"two export targets are named {target.name!r}")
        found[target.name] = target
    return found


def all_flags(registered: Mapping[str, Target]) -> dict[str, tuple[Flag, list[str]]]:
    """option -> (its Flag, the targets that take it). Two targets may share a flag only if identical."""
    flags: dict[str, tuple[Flag, list[str]]] = {}
    for target in registered.values():
        for flag in target.flags:
            if flag.option in flags and flags[flag.option][0] != flag:
                raise ValueError(f"targets {flags[flag.option][1]} and {target.name} declare {flag.option} differently")
            flags.setdefault(flag.option, (flag, []))[1].append(target.name)
    return flags


def check_flags(target: Target, given: Mapping[str, object], registered: Mapping[str, Target]) -> None:
    """One LowbitError line for a flag given that the chosen target does not take."""
    own = {f.option for f in target.flags}
    for option, (flag, owners) in all_flags(registered).items():
        if flag.dest in given and option not in own:
            takes = ", ".join(sorted(own)) or "no extra flags"
            raise LowbitError(f"{option} is a flag of --format {'/'.join(owners)}, not of --format "
                              f"{target.name} (which takes {takes})")


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before any slow work when OUT exists (unless overwrite) or is a file.

    (lowbit_dir.check_out says the same, but that module imports torch, and this one is imported
    whenever the command-line parser is built.)
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"--out {out} already exists and is not empty (pass --overwrite to replace it)")


def check_out_file(out: Path, overwrite: bool) -> None:
    """Fail before any slow work when the OUT file exists (unless overwrite) or is a directory."""
    if out.is_dir():
        raise LowbitError(f"--out {out} is a directory; this format writes one file")
    if out.exists() and not overwrite:
        raise LowbitError(f"--out {out} already exists (pass --overwrite to replace it)")


def _export_file(target: Target, src: str, out: Path, overwrite: bool, options: Mapping[str, object]) -> ExportReport:
    """A one-file target: the writer creates a temporary sibling file, renamed into place."""
    check_out_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp")) / out.name
    start = time.perf_counter()
    try:
        report = target.write(src, tmp, options)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    facts = {"format": target.name, "source": src, "out": str(out), **report.facts,
             "disk MiB": out.stat().st_size / 2**20, "seconds": time.perf_counter() - start}
    return ExportReport(facts, report.notes)


def export(target: Target, src: str, out: Path, overwrite: bool, options: Mapping[str, object]) -> ExportReport:
    """Write `src` as `target` into OUT atomically: a temporary sibling directory renamed into place."""
    out = Path(out)
    if target.output == "file":
        return _export_file(target, src, out, overwrite, options)
    check_out(out, overwrite)
    if target.source == "quantized":
        from ..models.registry import resolve

        kind = resolve(src).kind
        if kind != "lowbit":
            raise LowbitError(f"--format {target.name} exports a lowbit quantized directory (from `lowbit "
                              f"quantize`), but {src} is a {kind} model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    start = time.perf_counter()
    try:
        report = target.write(src, tmp, options)
        _publish_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    facts = {"format": target.name, "source": src, "out": str(out), **report.facts,
             "disk MiB": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20,
             "seconds": time.perf_counter() - start}
    notes = report.notes
    acts = _activation_formats(src) if target.name != "compressed-tensors" else ""
    if acts:
        notes = (*notes, f"the source also quantizes its linears' inputs ({acts}); {target.name} stores weights "
                         "only: a reader runs them on float inputs")
    return ExportReport(facts, notes)


def _activation_formats(src: str) -> str:
    """The activation formats a lowbit directory's linears carry, comma-joined ("" for weight-only)."""
    import json

    from ..models.registry import resolve

    source = resolve(src)
    if source.kind != "lowbit":
        return ""
    entries = json.loads((source.path / "lowbit.json").read_text()).get("tensors", {})
    return ", ".join(sorted({str(e["activations"].get("bits")) + "-bit " + e["activations"].get("granularity", "")
                             for e in entries.values() if "activations" in e}))


def _publish_modes(root: Path) -> None:
    """Give OUT the modes a normal directory gets (mkdtemp makes it 0700; some writers make 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
