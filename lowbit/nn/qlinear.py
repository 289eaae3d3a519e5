"""Weight-only quantized linear used at run time (simulated: dequantize once, float matmul)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import QTensor


def hold_qtensor(module: nn.Module, q: QTensor) -> None:
    """Give `module` q's format, shape and its codes/scales/zeros as buffers (the saved state)."""
    module.fmt = q.fmt
    module.out_features, module.in_features = q.shape
    module.register_buffer("codes", q.codes)
    module.register_buffer("scales", q.scales)
    module.register_buffer("zeros", q.zeros)


def held_qtensor(module: nn.Module) -> QTensor:
    """The QTensor hold_qtensor stored on `module`."""
    return QTensor(module.codes, module.scales, module.zeros, (module.out_features, module.in_features), module.fmt)


class QuantLinear(nn.Module):
    """y = x W_dqᵀ + b, where W_dq = fmt.dequantize(codes, scales, zeros).

    The integer codes, scales and zero-points are the module's state; the float weight is a
    deterministic function of them, computed once and cached (not saved), so a reloaded
    module computes bit-identical outputs.
    """

    def __init__(self, q: QTensor, bias: Tensor | None = None):
        super().__init__()
        hold_qtensor(self, q)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("W_dq", self.fmt.dequantize(q), persistent=False)

    @property
    def qtensor(self) -> QTensor:
        return held_qtensor(self)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight: lets code that reads `.weight` (tying checks, hooks) keep working."""
        return self.W_dq

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.W_dq.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt.name}"
