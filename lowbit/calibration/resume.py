"""Per-layer checkpoints of the calibration walk: a run killed at any point continues with --resume
from its last finished layer and writes the same bytes as an uninterrupted run.

Layout of the checkpoint directory (beside --out, `.NAME.resume/`):
  run.json                 the fingerprint of the run (config, model, calibration tokens, versions)
                           and how many layers are finished; replaced atomically, written last
  layer-NNN.safetensors    layer NNN as it was written back: each QuantLinear's packed codes,
                           scales, zeros (and signs, outliers, input scale) and the layer's float
                           tensors (norms that AWQ or SmoothQuant rescaled)
  layer-NNN.json           its QuantLinears' manifest entries and the records quantize() keeps
                           (per-linear reports)
  inputs-NNN.safetensors   the calibration activations entering layer NNN, one tensor per sample
Every file is written under a temporary name and renamed, and run.json moves only after the
files it points at exist, so a kill between any two writes leaves the previous state whole.
Restoring rebuilds each QuantLinear from its packed state exactly as `load_quantized` does, so
the final directory packs the same codes; the activations are stored bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import LowbitError
from ..log import logger

STATE = "run.json"
SCHEMA = 1


def checkpoint_dir(out: Path) -> Path:
    """Where the checkpoints of a run writing `out` live: a hidden sibling directory."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def first_difference(a, b, path: str = "") -> str | None:
    """The first key path where two JSON-like values differ, with both values; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}{key}: {'absent' if key not in a else _short(a[key])} here, " \
                       f"{'absent' if key not in b else _short(b[key])} in the checkpoint"
            found = first_difference(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        return None
    if a != b:
        return f"{path.rstrip('.') or 'value'}: {_short(a)} here, {_short(b)} in the checkpoint"
    return None


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Checkpoint:
    """The checkpoints of one run in `root`; `fingerprint` (JSON) identifies the run.

    save_records(index) -> JSON: what the caller keeps about layer `index` (its reports);
    load_records(index, JSON): give it back on resume.
    """

    root: Path
    fingerprint: dict
    save_records: Callable[[int], object] = lambda index: None
    load_records: Callable[[int, object], None] = lambda index, records: None
    finished: int = field(default=0, init=False)

    @classmethod
    def start(cls, root: Path, fingerprint: dict, resume: bool, **hooks) -> "Checkpoint":
        """A fresh checkpoint (removing nothing but a previous one's files when not `resume`), or the
        existing one when `resume`; LowbitError if the existing one belongs to another run."""
        root = Path(root)
        fingerprint = json.loads(json.dumps(fingerprint))   # as it reads back from run.json
        ckpt = cls(root, fingerprint, **hooks)
        state_path = root / STATE
        if resume:
            if not state_path.is_file():
                raise LowbitError(f"--resume: no checkpoint at {root} (the run never finished a layer, or "
                                  "--out differs)")
            try:
                state = json.loads(state_path.read_text())
                saved, finished = state["fingerprint"], int(state["finished"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LowbitError(f"--resume: {state_path} is unreadable ({type(e).__name__}); remove {root} "
                                  "to start over") from None
            if state.get("schema") != SCHEMA:
                raise LowbitError(f"--resume: {state_path} has schema {state.get('schema')!r}; this lowbit "
                                  f"writes {SCHEMA}")
            diff = first_difference(fingerprint, saved)
            if diff:
                raise LowbitError(f"--resume: the checkpoint at {root} is another run's ({diff}); rerun its "
                                  f"command, or drop --resume and pass --overwrite to start over")
            ckpt.finished = finished
            logger.info("resuming after layer %d of the checkpoint in %s", finished - 1, root)
            return ckpt
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _atomic_json(state_path, {"schema": SCHEMA, "fingerprint": fingerprint, "finished": 0})
        return ckpt

    # -- the walker's side -------------------------------------------------------------------
    def restore(self, layers: torch.nn.ModuleList, each=None) -> list[torch.Tensor] | None:
        """Put the finished layers back into `layers` (in place), calling each(index, layer) after each
        one (a lazy model writes it to its stream and drops it: one layer in memory at a time); the
        inputs of the next layer, one tensor per sample, or None when nothing is finished."""
        if not self.finished:
            return None
        for index in range(self.finished):
            self._restore_layer(index, layers[index])
            if each is not None:
                each(index, layers[index])
        inputs = load_file(str(self.root / f"inputs-{self.finished:03d}.safetensors"))
        return [inputs[str(i)] for i in range(len(inputs))]

    def layer_done(self, index: int, layer: torch.nn.Module, outputs) -> None:
        """Record finished layer `index` and `outputs` (iterable of per-sample tensors: the next inputs)."""
        from ..nn.qstate import pack_module

        tensors, entries = pack_module(layer)
        _atomic_tensors(self.root / f"layer-{index:03d}.safetensors", tensors)
        _atomic_json(self.root / f"layer-{index:03d}.json",
                     {"entries": entries, "records": self.save_records(index)})
        _atomic_tensors(self.root / f"inputs-{index + 1:03d}.safetensors",
                        {str(i): h for i, h in enumerate(outputs)})
        _atomic_json(self.root / STATE, {"schema": SCHEMA, "fingerprint": self.fingerprint, "finished": index + 1})
        old = self.root / f"inputs-{index:03d}.safetensors"
        if old.exists():
            old.unlink()                  # superseded: run.json now points past it
        self.finished = index + 1

    def _restore_layer(self, index: int, layer: torch.nn.Module) -> None:
        from ..nn.qstate import unpack_module

        meta = json.loads((self.root / f"layer-{index:03d}.json").read_text())
        tensors = load_file(str(self.root / f"layer-{index:03d}.safetensors"))
        unpack_module(layer, meta["entries"], tensors)
        self.load_records(index, meta["records"])

    def close(self) -> None:
        """The run finished and its output is written: the checkpoint goes."""
        shutil.rmtree(self.root, ignore_errors=True)
