"""Dense-and-sparse storage: weights kept in float16 beside a low-bit dense part (methods.outliers
chooses them; nn.QuantLinear applies them). Two layouts:
  entries  single weights (SpQR-style): a 32-bit flat index and a 16-bit value each;
  columns  whole input columns (OWQ-style): a 32-bit column index each and its out float16 values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INDEX_BITS, VALUE_BITS = 32, 16


def sparse_bits(index: Tensor, values: Tensor) -> int:
    """Stored bits of a kept part: indices (32 bits each) and float16 values."""
    return index.numel() * INDEX_BITS + values.numel() * VALUE_BITS


@dataclass(frozen=True, eq=False)
class SparseOutliers:
    """Kept weights of a weight of `shape` [out, in]: index int32 ascending — flat row·in + col with
    values float16 [k] (entries), or column numbers with values float16 [out, c] (columns)."""

    index: Tensor
    values: Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        k = self.index.numel()
        want = (k,) if self.values.dim() == 1 else (self.shape[0], k)
        if self.index.dtype != torch.int32 or self.values.dtype != torch.float16 or tuple(self.values.shape) != want:
            raise ValueError(f"SparseOutliers: int32 index and float16 values {want}, got "
                             f"{self.index.dtype} {tuple(self.index.shape)} / {self.values.dtype} {tuple(self.values.shape)}")
        n = self.shape[0] * self.shape[1] if self.layout == "entries" else self.shape[1]
        if k and (int(self.index.min()) < 0 or int(self.index.max()) >= n or bool((self.index[1:] <= self.index[:-1]).any())):
            raise ValueError(f"SparseOutliers: indices must be ascending and inside [0, {n})")

    @property
    def layout(self) -> str:
        return "entries" if self.values.dim() == 1 else "columns"

    @property
    def kept(self) -> int:
        """Weights kept in float16."""
        return self.values.numel()

    @property
    def storage_bits(self) -> int:
        return sparse_bits(self.index, self.values)

    def apply(self, W_dq: Tensor) -> Tensor:
        """W_dq [out, in] with the kept weights in place of the dense part's values."""
        out = W_dq.clone()
        if self.layout == "entries":
            out.view(-1)[self.index.long()] = self.values.to(out.dtype)
        else:
            out[:, self.index.long()] = self.values.to(out.dtype)
        return out

    @classmethod
    def from_mask(cls, W: Tensor, mask: Tensor, layout: str = "entries") -> "SparseOutliers":
        """The entries of W [out, in] where mask [out, in] is true, as float16 (columns: mask holds whole columns)."""
        if layout == "columns":
            cols = mask.all(0).nonzero().squeeze(1)                          # ascending column numbers
            if not torch.equal(mask, mask.all(0, keepdim=True).expand_as(mask)):
                raise ValueError("a columns layout needs a mask of whole columns")
            return cls(cols.to(torch.int32), W[:, cols].to(torch.float16).contiguous(), tuple(W.shape))
        index = mask.reshape(-1).nonzero().squeeze(1)                   # ascending flat positions
        return cls(index.to(torch.int32), W.reshape(-1)[index].to(torch.float16), tuple(W.shape))
