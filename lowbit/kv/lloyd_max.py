"""Lloyd–Max scalar quantizers for the coordinates of a randomly rotated unit vector (TurboQuant).

After a uniformly random rotation, one coordinate x of a unit vector in d dimensions has density
    f_d(x) = Γ(d/2) / (√π Γ((d−1)/2)) · (1 − x²)^((d−3)/2)   on [−1, 1]
(≈ N(0, 1/d) for large d). The b-bit Lloyd–Max quantizer of f_d minimises E[(x − q(x))²]; it is
the fixed point of two conditions, iterated here from f_d's quantiles:
  * centroid: each level is the mean of x over its cell, c_i = E[x | t_i ≤ x < t_(i+1)];
  * midpoint: each boundary is halfway between neighbouring levels, t_i = (c_(i−1) + c_i) / 2.
The levels are computed, not tabulated: one cumulative quadrature of f_d and of x·f_d on a fine
grid gives every cell's mass and first moment.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

GRID = 1 << 18          # quadrature points on [−1, 1]


def coordinate_density(x: Tensor, d: int) -> Tensor:
    """f_d(x) for |x| ≤ 1 (float64), 0 outside."""
    if d < 3:
        raise ValueError(f"the coordinate density needs d >= 3, got {d}")
    log_c = math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)
    inside = x.abs() < 1
    body = torch.exp(log_c + (d - 3) / 2 * torch.log1p(-(x * x).clamp(max=1 - 1e-300)))
    return torch.where(inside, body, torch.zeros_like(x))


def _cumulative(d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Grid x [GRID], and the cumulative integrals of f_d and x·f_d from −1 (trapezoid rule)."""
    x = torch.linspace(-1.0, 1.0, GRID, dtype=torch.float64)
    f = coordinate_density(x, d)
    dx = x[1] - x[0]
    cum = lambda g: torch.cat([g.new_zeros(1), torch.cumsum((g[1:] + g[:-1]) * dx / 2, 0)])
    return x, cum(f), cum(x * f)


def _at(x: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation of y(x) at points t."""
    i = torch.searchsorted(x, t).clamp(1, x.numel() - 1)
    w = (t - x[i - 1]) / (x[i] - x[i - 1])
    return y[i - 1] + w * (y[i] - y[i - 1])


@functools.lru_cache(maxsize=64)
def lloyd_max(d: int, bits: int, iterations: int = 2000, tol: float = 1e-13) -> tuple[Tensor, Tensor]:
    """(levels [2^bits], boundaries [2^bits − 1]) of the b-bit Lloyd–Max quantizer of f_d, float64,
    ascending and symmetric about 0. Cached: the result is shared, do not modify it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"Lloyd-Max levels for 1..8 bits, got {bits!r}")
    x, F, G = _cumulative(d)
    k = 1 << bits
    # start from the quantiles' midpoints: cell i holds mass 1/k
    t = _at(F / F[-1], x, torch.arange(1, k, dtype=torch.float64) / k)
    for _ in range(iterations):
        edges = torch.cat([x.new_tensor([-1.0]), t, x.new_tensor([1.0])])
        mass, moment = _at(x, F, edges).diff(), _at(x, G, edges).diff()
        levels = moment / mass                                          # centroid condition
        new_t = (levels[1:] + levels[:-1]) / 2                          # midpoint condition
        done = float((new_t - t).abs().max()) < tol
        t = new_t
        if done:
            break
    levels = (levels - levels.flip(0)) / 2                               # exact symmetry (f_d is even)
    t = (levels[1:] + levels[:-1]) / 2
    return levels, t


def mse(d: int, bits: int) -> float:
    """E[(x − q(x))²] of lloyd_max(d, bits) under f_d (per coordinate; d times it per unit vector)."""
    levels, t = lloyd_max(d, bits)
    x, _, _ = _cumulative(d)
    f = coordinate_density(x, d)
    q = levels[torch.bucketize(x, t)]
    g = (x - q) ** 2 * f
    return float(torch.trapezoid(g, x))
