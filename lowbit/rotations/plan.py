"""A rotation plan: which rotations, of what kind, from which seed — saved with the model, applied
as its own step before any quantization (QuaRot: randomized Hadamards; SpinQuant: learned R1/R2
loaded from a file)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .fuse import check_rotatable, fuse_norms, rotate_down_input, rotate_heads, rotate_residual
from .hadamard import orthogonal
from .spinquant import SpinConfig

KINDS = ("hadamard", "random")


@dataclass(frozen=True)
class RotationConfig:
    """kind: "hadamard" (randomized Hadamard, random orthogonal with a warning where no construction
    exists) or "random" (Haar orthogonal); seed: the random signs / Gaussian; r2: per-head v/o
    rotation; r4: online Hadamard before down_proj; learned: a safetensors file with R1 [hidden,
    hidden] and R2 [head_dim, head_dim] (SpinQuant's) used instead of seeded ones; spin_steps > 0:
    SpinQuant — R1/R2 trained from the seeded ones on the calibration samples (spinquant.py) first,
    with the weights quantized during training only when spin_weights."""

    kind: str = "hadamard"
    seed: int = 0
    r2: bool = True
    r4: bool = True
    learned: str | None = None
    spin_steps: int = 0
    spin_lr: float = 1.5
    spin_time_limit: float = 1800.0
    spin_weights: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown rotation kind {self.kind!r} (known: {', '.join(KINDS)})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"rotation seed must be an integer, got {self.seed!r}")
        if self.learned is not None and not Path(self.learned).is_file():
            raise ValueError(f"learned rotations: no file {self.learned}")
        if isinstance(self.spin_steps, bool) or not isinstance(self.spin_steps, int) or self.spin_steps < 0:
            raise ValueError(f"spin_steps must be an integer >= 0, got {self.spin_steps!r}")
        if self.spin_steps and self.learned is not None:
            raise ValueError("give learned rotations or spin_steps, not both")
        if self.spin_steps:
            self.spin        # validates lr and time limit

    @property
    def spin(self) -> SpinConfig | None:
        return SpinConfig(self.spin_steps, self.spin_lr, self.spin_time_limit, self.spin_weights) if self.spin_steps else None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RotationConfig":
        known = [f.name for f in fields(cls)]
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown rotation option(s) {sorted(unknown)} (known: {', '.join(known)})")
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
