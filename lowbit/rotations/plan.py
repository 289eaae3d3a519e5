"""A rotation plan: which rotations, of what kind, from which seed — saved with the model, applied
as its own step before any quantization (QuaRot: randomized Hadamards; SpinQuant: learned R1/R2
loaded from a file)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .fuse import check_rotatable, fuse_norms, rotate_down_input, rotate_heads, rotate_residual
from .hadamard import orthogonal

KINDS = ("hadamard", "random")


@dataclass(frozen=True)
class RotationConfig:
    """kind: "hadamard" (randomized Hadamard, random orthogonal with a warning where no construction
    exists) or "random" (Haar orthogonal); seed: the random signs / Gaussian; r2: per-head v/o
    rotation; r4: online Hadamard before down_proj; learned: a safetensors file with R1 [hidden,
    hidden] and R2 [head_dim, head_dim] (SpinQuant's) used instead of seeded ones."""

    kind: str = "hadamard"
    seed: int = 0
    r2: bool = True
    r4: bool = True
    learned: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown rotation kind {self.kind!r} (known: {', '.join(KINDS)})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"rotation seed must be an integer, got {self.seed!r}")
        if self.learned is not None and not Path(self.learned).is_file():
            raise ValueError(f"learned rotations: no file {self.learned}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "r2": self.r2, "r4": self.r4, "learned": self.learned}

    @classmethod
    def from_dict(cls, d: dict) -> "RotationConfig":
        unknown = set(d) - {"kind", "seed", "r2", "r4", "learned"}
        if unknown:
            raise ValueError(f"unknown rotation option(s) {sorted(unknown)} (known: kind, seed, r2, r4, learned)")
        return cls(**d)


def rotation_matrices(config: RotationConfig, hidden: int, head_dim: int) -> dict[str, torch.Tensor]:
    """{"R1": [hidden, hidden], "R2": [head_dim, head_dim] (when r2)} float64 orthogonal."""
    if config.learned is not None:
        from safetensors.torch import load_file

        found = load_file(config.learned)
        return {k: found[k].double() for k in ("R1", "R2") if k in found and (k == "R1" or config.r2)}
    out = {"R1": orthogonal(hidden, config.kind, config.seed)}
    if config.r2:
        out["R2"] = orthogonal(head_dim, config.kind, config.seed + 1)
    return out


def rotate(model: nn.Module, spec, dims, config: RotationConfig,
           matrices: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Apply `config` to `model` in place (norms fused, R1, R2, online R4); returns the matrices used.
    ValueError when the family cannot take R1 (its spec says why)."""
    check_rotatable(spec)
    matrices = matrices if matrices is not None else rotation_matrices(config, dims.hidden, dims.head_dim)
    fuse_norms(model, spec)
    rotate_residual(model, spec, matrices["R1"])
    if "R2" in matrices:
        rotate_heads(model, spec, dims.head_dim, matrices["R2"])
    if config.r4:
        rotate_down_input(model, spec)
    return matrices
