"""Weight-only quantized linear used at run time (simulated: dequantize once, float matmul)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import QTensor


class QuantLinear(nn.Module):
    """y = x W_dqᵀ + b, where W_dq = fmt.dequantize(codes, scales, zeros).

    The integer codes, scales and zero-points are the module's state; the float weight is a
    deterministic function of them, computed once and cached (not saved), so a reloaded
    module computes bit-identical outputs.
    """

    def __init__(self, q: QTensor, bias: Tensor | None = None):
        super().__init__()
        self.fmt = q.fmt
        self.out_features, self.in_features = q.shape
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("W_dq", self.fmt.dequantize(q), persistent=False)

    @property
    def qtensor(self) -> QTensor:
        return QTensor(self.codes, self.scales, self.zeros, (self.out_features, self.in_features), self.fmt)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight: lets code that reads `.weight` (tying checks, hooks) keep working."""
        return self.W_dq

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.W_dq.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt.name}"
