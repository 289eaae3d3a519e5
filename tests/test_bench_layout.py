"""The benchmark scripts run as `python bench/X.py`, which puts bench/ first on sys.path: a script
named like an installed package (bench/gguf.py once did) would shadow it for every other script.
(bench/peers/ is imported as the package `peers`, or appended after the standard library.)"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_module_shadows_an_installed_package():
    bench_dirs = {str(BENCH), str(BENCH / "peers")}
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) not in bench_dirs]
    try:
        shadowing = []
        for script in sorted(BENCH.glob("*.py")):
            loaded = sys.modules.get(script.stem)
            if loaded is not None:  # already imported: shadowing unless it is this very file
                ours = Path(getattr(loaded, "__file__", None) or "/").resolve() == script.resolve()
                spec = None if ours else True
            else:
                spec = importlib.util.find_spec(script.stem)
            if spec is not None:
                shadowing.append(script.name)
    finally:
        sys.path[:] = saved
    assert len(list(BENCH.glob("*.py"))) >= 4 and shadowing == []
