"""SmoothQuant (Xiao et al. 2023): move the activations' outliers into the weights.

For a group of linears sharing an input X [tokens, in], per input channel j

    s_j = max|X_j|^α / max|W_j|^(1−α)          (max|W_j| over every row of every linear in the group)

and X W_iᵀ = (X diag(s)⁻¹)(W_i diag(s))ᵀ exactly, so the scales are folded into whatever makes
X (transforms.scaling.fold_scales) and the weights. α = 0.5 is the paper's default; α can
also be searched per group on the quantized group's output error over calibration rows:

    err(α) = Σ_i ‖Q_a(X / s) Q_w(W_i s)ᵀ − X W_iᵀ‖² / Σ_i ‖X W_iᵀ‖²

with Q_a the group's activation format and Q_w each linear's weight format (round to nearest).
Everything here is a pure tensor function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats.activation import ActFormat, fake_quantize_act, static_scale

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))   # 0.0, 0.1, …, 1.0
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothConfig:
    """alpha: a fixed migration strength in [0, 1], or None to search `alphas` per group."""

    alpha: float | None = 0.5
    alphas: tuple[float, ...] = ALPHA_GRID

    def __post_init__(self):
        values = ([] if self.alpha is None else [self.alpha]) + list(self.alphas)
        if not self.alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1
                                  for a in values):
            raise ValueError(f"smoothing alpha must be a number in [0, 1] (or 'search'), got {self.alpha!r} "
                             f"with grid {self.alphas!r}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))


def weight_absmax(Ws: list[Tensor]) -> Tensor:
    """max_i,n |W_i[n, j]| per input channel j, [in], of weights W_i [out_i, in]."""
    return torch.stack([W.detach().float().abs().amax(0) for W in Ws]).amax(0)


def smoothquant_scales(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """s [in] = max|X_j|^α / max|W_j|^(1−α), both floored at MIN_SCALE (dead channels), s too."""
    x = x_absmax.double().clamp_min(MIN_SCALE)
    w = w_absmax.double().clamp_min(MIN_SCALE)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(MIN_SCALE).float()


def act_scale_after(act: ActFormat, x_absmax: Tensor, rows: Tensor | None, s: Tensor) -> Tensor | None:
    """A static activation format's calibrated scale for the input X / s (None for dynamic)."""
    if act is None or not act.static:
        return None
    return static_scale(act, absmax=float((x_absmax / s).max()), rows=None if rows is None else rows / s)


def quantized_output_error(X: Tensor, Ws: list[Tensor], w_fmts: list, act: ActFormat | None, s: Tensor,
                           x_absmax: Tensor) -> float:
    """err(α) above for rows X [T, in], weights W_i [out_i, in], scales s [in] (see module doc)."""
    X = X.float()
    Xs = X / s
    Xq = Xs if act is None else fake_quantize_act(Xs, act, act_scale_after(act, x_absmax, X, s))
    num = den = 0.0
    for W, fmt in zip(Ws, w_fmts):
        W = W.detach().float()
        Y = X @ W.T                                              # [T, out_i]
        W_dq = W * s if fmt is None else fmt.fake_quantize(W * s)
        num += float((Xq @ W_dq.T - Y).pow(2).sum())
        den += float(Y.pow(2).sum())
    return num / max(den, 1e-30)


def search_alpha(X: Tensor, x_absmax: Tensor, w_absmax: Tensor, Ws: list[Tensor], w_fmts: list,
                 act: ActFormat | None, alphas: tuple[float, ...] = ALPHA_GRID) -> tuple[float, Tensor, dict]:
    """(best α, its scales s [in], {α: err(α)}) over the grid; ties go to the smaller α.
    x_absmax, w_absmax [in]: max|X_j| and max|W_j| (weight_absmax), as smoothquant_scales takes them."""
    errors = {}
    for a in alphas:
        errors[a] = quantized_output_error(X, Ws, w_fmts, act, smoothquant_scales(x_absmax, w_absmax, a), x_absmax)
    best = min(errors, key=lambda a: (errors[a], a))
    return best, smoothquant_scales(x_absmax, w_absmax, best), errors
