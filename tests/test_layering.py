"""The package's layering, held by parsing every import (function-level ones included).

The allowed imports are written once, in docs/architecture.md ("Layers"); this test reads that
table, so the document and the code cannot drift apart.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowbit"


def layer_rules() -> dict[str, list[str]]:
    """{layer: forbidden module prefixes} from the architecture notes' Layers table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`lowbit."):
            continue
        forbidden = re.findall(r"`(lowbit[\w.]*)`", cells[2])
        rules[cells[0].strip("`")] = forbidden
    return rules


def imports_of(path: Path, module: str | None = None) -> list[str]:
    """Absolute module names imported anywhere in `path` (relative imports resolved against
    `module`, by default the file's own dotted name)."""
    module = module or ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.append(prefix)
            found += [f"{prefix}.{a.name}" for a in node.names]  # `from lowbit import methods`
    return [m for m in found if m == "lowbit" or m.startswith("lowbit.")]


def test_the_rules_are_read_from_the_architecture_notes():
    rules = layer_rules()
    assert {"lowbit.formats", "lowbit.methods", "lowbit.export"} <= set(rules)
    assert "lowbit.calibration" in rules["lowbit.methods"] and "lowbit.methods" in rules["lowbit.export"]


@pytest.mark.parametrize("layer", sorted(layer_rules()))
def test_no_layer_imports_what_it_must_not(layer):
    forbidden = layer_rules()[layer]
    folder = PACKAGE.joinpath(*layer.split(".")[1:])
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    assert files, f"{layer} has no files"
    bad = [f"{f.relative_to(ROOT)} imports {m}" for f in files for m in violations(imports_of(f), forbidden)]
    assert not bad, "\n".join(bad)


def violations(imported: list[str], forbidden: list[str]) -> list[str]:
    return [m for m in imported if any(m == p or m.startswith(p + ".") for p in forbidden)]


def test_the_checker_sees_a_function_level_relative_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef f():\n    from ..calibration.walker import walk\n    from . import rtn\n")
    found = imports_of(probe, module="lowbit.methods.probe")
    assert "lowbit.calibration.walker" in found and "lowbit.methods.rtn" in found
    bad = violations(found, layer_rules()["lowbit.methods"])
    assert "lowbit.calibration.walker" in bad and not any("rtn" in m for m in bad)
