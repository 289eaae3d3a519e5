"""A scale plan: what a search (AWQ) decided, saved and applied as a separate step.

On disk, a plan is a directory with plan.json (metadata and an index of the tensors) and
plan.safetensors (the tensors, float32):
  layers.{i}.{group source}.scales   [in]             input scales of one spec group
  layers.{i}.{linear}.clip           [out, n_groups]  optional clip factors for plan.meta's format
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.models.specs import ArchSpec, ModelDims
from lowbit.transforms.scaling import fold_scales

JSON_NAME, TENSORS_NAME, SCHEMA = "plan.json", "plan.safetensors", 1


@dataclass
class ScalePlan:
    """scales[layer][group source] = s [in] (> 0); clips[layer][linear] = factors [out, n_groups]
    in (0, 1] for the format named in meta["format"]; meta: JSON-safe description."""

    scales: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    clips: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write plan.json and plan.safetensors into directory `path` (created); returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, index = {}, {"scales": [], "clips": []}
        for kind, suffix in (("scales", "scales"), ("clips", "clip")):
            for layer, entries in sorted(getattr(self, kind).items()):
                for name, t in entries.items():
                    key = f"layers.{layer}.{name}.{suffix}"
                    tensors[key] = t.detach().float().contiguous()
                    index[kind].append({"layer": int(layer), "name": name, "tensor": key})
        save_file(tensors, str(path / TENSORS_NAME))
        (path / JSON_NAME).write_text(json.dumps({"schema": SCHEMA, "meta": self.meta, **index}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScalePlan":
        """Inverse of save (ValueError on a missing or malformed plan)."""
        path = Path(path)
        try:
            doc = json.loads((path / JSON_NAME).read_text())
            tensors = load_file(str(path / TENSORS_NAME))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable scale plan: {e}") from None
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"{path / JSON_NAME}: schema {doc.get('schema')!r}, expected {SCHEMA}")
        plan = cls(meta=doc.get("meta", {}))
        for kind in ("scales", "clips"):
            for e in doc.get(kind, []):
                if e["tensor"] not in tensors:
                    raise ValueError(f"{path / TENSORS_NAME} lacks {e['tensor']}")
                getattr(plan, kind).setdefault(int(e["layer"]), {})[e["name"]] = tensors[e["tensor"]]
        return plan


def apply_plan(model: torch.nn.Module, spec: ArchSpec, plan: ScalePlan) -> None:
    """Fold every scale of `plan` into `model` (in place, function-preserving). Clips are not
    applied here: they are used when the weights are quantized."""
    layers = model.get_submodule(spec.layers)
    head_dim = ModelDims.from_config(model.config).head_dim
    groups = {g.source: g for g in spec.groups}
    for index, entries in sorted(plan.scales.items()):
        if not 0 <= index < len(layers):
            raise ValueError(f"plan names layer {index}; the model has {len(layers)}")
        for source, s in entries.items():
            if source not in groups:
                raise ValueError(f"plan names group {source!r}, unknown to spec {spec.family}")
            fold_scales(layers[index], groups[source], s, norm_offset=spec.norm_offset, head_dim=head_dim)
