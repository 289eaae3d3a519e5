"""One virtual environment per peer tool, kept apart from lowbit's own environment.

`ensure_venv(name, requirements)` creates ~/.cache/lowbit/venvs/<name> (or under $LOWBIT_CACHE)
on first use and returns its python. It is idempotent: a marker file records the requirements
that were installed, so a second call with the same list returns at once, and a changed list
installs into the same environment again.

Why torch first and a constraints file: peers pin transformers and friends freely, and some
depend on torch without saying which build; installing torch==2.13.0 first from the local CPU
wheel and then the peer with `-c` a file holding `torch==2.13.0+cpu` keeps every environment on
the same CPU build (no CUDA wheels pulled). PIP_CONSTRAINT carries the same file into pip's
isolated build environments, where a source package could otherwise fetch another torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
TORCH_CONSTRAINT = "torch==2.13.0+cpu"


def venvs_root() -> Path:
    base = Path(os.environ["LOWBIT_CACHE"]) if os.environ.get("LOWBIT_CACHE") else Path.home() / ".cache/lowbit"
    return base / "venvs"


def _pip(python: Path, args: list[str], constraints: Path, log) -> None:
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints))
    env.pop("PYTHONPATH", None)                 # nothing of lowbit's environment leaks into the peer's
    cmd = [str(python), "-I", "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=python.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} failed (exit {proc.returncode}); see {log.name}")


def ensure_venv(name: str, requirements: list[str]) -> Path:
    """The python of the peer environment `name` with torch 2.13.0 (CPU) and `requirements` installed."""
    root = venvs_root() / name
    python = root / "bin" / "python"
    marker = root / "lowbit-venv.json"
    wanted = {"torch": TORCH, "requirements": list(requirements)}
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == wanted:
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        # -I: this file is named venv.py; without isolation `-m venv` run from this folder would import it
        subprocess.run([sys.executable, "-I", "-m", "venv", str(root)], check=True, cwd=root.parent)
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH_CONSTRAINT + "\n")
    marker.unlink(missing_ok=True)              # a failed install below leaves no stale marker
    with open(root / "install.log", "a") as log:
        _pip(python, [TORCH], constraints, log)
        if requirements:
            _pip(python, ["-c", str(constraints), *requirements], constraints, log)
    version = subprocess.run([str(python), "-I", "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    if version != "2.13.0+cpu":                 # the whole point of the environment: refuse anything else
        raise RuntimeError(f"peer environment {name} ended up with torch {version}, not 2.13.0+cpu")
    marker.write_text(json.dumps(wanted, indent=1))
    return python


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="create (or check) one peer environment")
    p.add_argument("name")
    p.add_argument("requirements", nargs="*")
    a = p.parse_args()
    print(ensure_venv(a.name, a.requirements))
