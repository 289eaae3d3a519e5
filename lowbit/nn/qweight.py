"""A quantized weight of a module that is not a linear (the token embedding under a GGUF mix).

The owner keeps its own class and forward (Gemma's scaled embedding stays itself); its `weight`
parameter holds W_dq in place (so a tied LM head, which shares that parameter, computes with the
same de-quantized values), and a child `qweight` holds the codes that are saved and exported.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor
from .qlinear import held_qtensor, hold_qtensor

HOLDER = "qweight"  # child name under the owner module


class QuantWeight(nn.Module):
    """codes + scales (+ zeros) of the owner's weight; no forward of its own."""

    def __init__(self, q: QTensor):
        super().__init__()
        hold_qtensor(self, q)

    @property
    def qtensor(self) -> QTensor:
        return held_qtensor(self)

    def extra_repr(self) -> str:
        return f"shape=({self.out_features}, {self.in_features}), fmt={self.fmt.name}"


@torch.no_grad()
def attach_quantized_weight(owner: nn.Module, q: QTensor) -> None:
    """Give `owner` (an nn.Embedding or the like) the quantized weight q: its weight becomes W_dq in place."""
    if tuple(owner.weight.shape) != q.shape:
        raise ValueError(f"quantized weight {q.shape} does not fit {type(owner).__name__} {tuple(owner.weight.shape)}")
    owner.weight.data = q.fmt.dequantize(q).to(owner.weight.dtype)
    owner.add_module(HOLDER, QuantWeight(q))


def quantized_weights(model: nn.Module) -> dict[str, QuantWeight]:
    """{owner module name: its QuantWeight} for every module carrying one."""
    suffix = "." + HOLDER
    return {name[: -len(suffix)]: m for name, m in model.named_modules() if isinstance(m, QuantWeight)}
