"""Dense-and-sparse storage: weights kept in float16 beside a low-bit dense part (methods.outliers
chooses them; nn.QuantLinear applies them). A 32-bit flat index and a 16-bit value per kept weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INDEX_BITS, VALUE_BITS = 32, 16


@dataclass(frozen=True, eq=False)
class SparseOutliers:
    """index int32 [k] (ascending flat row·in + col), values float16 [k], of a weight of `shape`."""

    index: Tensor
    values: Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        k = self.index.numel()
        if self.index.dtype != torch.int32 or self.values.dtype != torch.float16 or self.values.shape != (k,):
            raise ValueError(f"SparseOutliers: int32 index and float16 values of one length, got "
                             f"{self.index.dtype} {tuple(self.index.shape)} / {self.values.dtype} {tuple(self.values.shape)}")
        n = self.shape[0] * self.shape[1]
        if k and (int(self.index.min()) < 0 or int(self.index.max()) >= n or bool((self.index[1:] <= self.index[:-1]).any())):
            raise ValueError(f"SparseOutliers: indices must be ascending and inside [0, {n})")

    @property
    def storage_bits(self) -> int:
        return self.index.numel() * (INDEX_BITS + VALUE_BITS)

    def apply(self, W_dq: Tensor) -> Tensor:
        """W_dq [out, in] with the kept weights in place of the dense part's values."""
        out = W_dq.clone()
        out.view(-1)[self.index.long()] = self.values.to(out.dtype)
        return out

    @classmethod
    def from_mask(cls, W: Tensor, mask: Tensor) -> "SparseOutliers":
        """The entries of W [out, in] where mask [out, in] is true, as float16."""
        index = mask.reshape(-1).nonzero().squeeze(1)                   # ascending flat positions
        return cls(index.to(torch.int32), W.reshape(-1)[index].to(torch.float16), tuple(W.shape))
