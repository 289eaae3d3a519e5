"""Rotations for incoherence processing: Hadamard matrices (Sylvester ⊗ Paley), randomized
Hadamard and Haar-random orthogonal matrices, and fast Hadamard transforms."""
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

__all__ = [
    "NoHadamardError",
    "fwht",
    "hadamard",
    "hadamard_transform",
    "has_hadamard",
    "orthogonal",
    "random_hadamard",
    "random_orthogonal",
    "random_signs",
]
