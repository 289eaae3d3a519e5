"""Rotations against outliers: Hadamard matrices (Sylvester ⊗ Paley) and fast transforms
(hadamard), QuaRot's rotations fused into a model (fuse, plan), SpinQuant's learned ones
(spinquant), QuIP's two-sided incoherence (incoherence). See docs/rotations.md."""
from lowbit.rotations.hadamard import (
    NoHadamardError,
    fwht,
    hadamard,
    hadamard_transform,
    has_hadamard,
    orthogonal,
    random_hadamard,
    random_orthogonal,
    random_signs,
)
from lowbit.rotations.plan import RotationConfig, rotate, rotation_matrices

__all__ = [
    "NoHadamardError",
    "RotationConfig",
    "fwht",
    "hadamard",
    "hadamard_transform",
    "has_hadamard",
    "orthogonal",
    "random_hadamard",
    "random_orthogonal",
    "random_signs",
    "rotate",
    "rotation_matrices",
]
