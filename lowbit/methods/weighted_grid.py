"""A grid whose quantizer weighs input columns, as AWQ's judge of a scaling.

A GGUF type quantized with an importance vector (llama.cpp's imatrix, mean x² per input column)
picks its block scales by where the inputs are large. Judging an AWQ scaling s on such a type
must quantize W·diag(s) with the importance of the *scaled* inputs x / s, i.e. importance / s².
WeightedGrid does that; `fmt` None is a linear the plan keeps in float (no quantization error).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import Format


@dataclass(frozen=True, eq=False)
class WeightedGrid:
    """fmt (a GGUFFormat, or None for float) with importance [in] (None: the type's default weighting)."""

    fmt: Format | None
    importance: Tensor | None = None

    @property
    def group_size(self) -> int:
        """Width of the scale blocks (AWQ's weight salience is relative to them)."""
        return 32 if self.fmt is None else self.fmt.group_size

    def _round_trip(self, W: Tensor, importance: Tensor | None) -> Tensor:
        if self.fmt is None:
            return W.float().clone()
        return self.fmt.dequantize(self.fmt.quantize(W, importance=importance))

    def fake_quantize(self, W: Tensor) -> Tensor:
        return self._round_trip(W, self.importance)

    def fake_quantize_scaled(self, W: Tensor, s: Tensor) -> Tensor:
        """Q(W·diag(s))·diag(s)⁻¹, Q weighted by the scaled inputs' mean square, importance / s²."""
        imp = None if self.importance is None else self.importance.double() / s.double().pow(2)
        return self._round_trip(W.float() * s, imp).div_(s)

