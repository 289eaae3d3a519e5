"""QuIP-style incoherence processing for low-bit weights: a randomized Hadamard on each side of W.

With the run-time transforms (row vectors, H the ±1 Hadamard of hadamard.py, s random signs)
    T_in(x)  = hadamard_transform(x · s_in)   = x M_inᵀ,   M_in  = H diag(s_in) / √n
    T_out(y) = hadamard_transform(y) · s_out  = y M_outᵀ,  M_out = diag(s_out) H / √m
a linear y = x Wᵀ becomes y = T_out(T_in(x) W̃ᵀ) with W̃ = M_outᵀ W M_inᵀ, which is exact since the
M are orthogonal; its input's Hessian becomes H̃ = M_in H M_inᵀ. W̃'s entries are spread evenly
(no outlier row or column survives the two Hadamards), so a 2–3-bit grid fits it better, and
GPTQ runs on (W̃, H̃) unchanged. The signs are the only extra state (n + m bits per linear).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .hadamard import hadamard, has_hadamard, random_signs


@dataclass(frozen=True)
class IncoherenceConfig:
    """seed: of the random signs (each layer's input group and each linear's output get their own)."""

    seed: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"incoherence seed must be an integer, got {self.seed!r}")


def signs_for(n: int, seed: int, layer: int, slot: int) -> Tensor:
    """The random signs [n] (float32 ±1) of one side of one linear (slot: a stable index per side)."""
    if not has_hadamard(n):
        raise ValueError(f"incoherence needs a Hadamard matrix of order {n}; none is constructible here")
    return random_signs(n, seed * 1_000_003 + layer * 1_009 + slot).float()


def _m_in(s_in: Tensor) -> Tensor:
    n = s_in.shape[0]
    return hadamard(n) * s_in.double()[None, :] / math.sqrt(n)      # H diag(s) / √n


def _m_out(s_out: Tensor) -> Tensor:
    m = s_out.shape[0]
    return s_out.double()[:, None] * hadamard(m) / math.sqrt(m)     # diag(s) H / √m


def incoherent_weight(W: Tensor, s_in: Tensor, s_out: Tensor) -> Tensor:
    """W [out, in] -> W̃ = M_outᵀ W M_inᵀ (float64)."""
    return _m_out(s_out).T @ W.double() @ _m_in(s_in).T


def incoherent_hessian(H: Tensor, s_in: Tensor) -> Tensor:
    """H [in, in] -> H̃ = M_in H M_inᵀ (float64)."""
    M = _m_in(s_in)
    return M @ H.double() @ M.T


def transform_input(x: Tensor, s_in: Tensor) -> Tensor:
    """T_in(x) for x [..., in]."""
    from .hadamard import hadamard_transform

    return hadamard_transform(x * s_in.to(x.dtype))


def transform_output(y: Tensor, s_out: Tensor) -> Tensor:
    """T_out(y) for y [..., out]."""
    from .hadamard import hadamard_transform

    return hadamard_transform(y) * s_out.to(y.dtype)
