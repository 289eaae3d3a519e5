"""NormalFloat (NF2/NF3/NF4) formats: a normal-quantile codebook with block absmax scales."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.formats import grouping
from lowbit.formats.base import Format, QTensor, fp16_scale


def nf_levels(bits: int) -> Tensor:
    """The 2**bits NF levels in [-1, 1], ascending, float32 [2**bits].

    QLoRA construction: 2**(bits-1) positive levels at normal quantiles of
    linspace(offset, 0.5, 2**(bits-1) + 1)[:-1], 2**(bits-1) - 1 negative levels at
    -quantiles of linspace(offset, 0.5, 2**(bits-1))[:-1], plus an exact zero, all divided
    by the largest. offset = mean(1 - 1/(2*(2**bits - 1)), 1 - 1/(2*2**bits)), which is
    QLoRA's 0.9677 for bits=4 and the same rule for bits 2 and 3.
    """
    n = 1 << bits
    half = n // 2
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    levels = levels / levels.max()
    return torch.sort(levels).values.float()


@dataclass(frozen=True)
class NFFormat(Format):
    """NF-k: codes are indices into nf_levels(bits); W_dq = scale * level[code].

    bits: 2..4. group_size: > 0 groups of input columns (ragged last group allowed),
    0 per output row, -1 per tensor. scale = group absmax (times clip), rounded up to fp16.
    """

    bits: int = 4
    group_size: int = 64

    family: ClassVar[str] = "nf"

    def __post_init__(self) -> None:
        grouping.check_bits("NFFormat", self.bits, 2, 4)
        grouping.check_group_size("NFFormat", self.group_size)

    @property
    def name(self) -> str:
        g = {0: "ch", -1: "tensor"}.get(self.group_size, f"g{self.group_size}")
        return f"nf{self.bits}-{g}"

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float16

    def _quant_grouped(self, W: Tensor, clip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """W [out, in] -> (idx [R, G, w] integer-valued float32, scale [R, G, 1], levels)."""
        Wg = grouping.to_groups(W, self.group_size)  # [R, G, w], ragged tail edge-padded
        absmax = grouping.group_absmax(Wg)
        if clip is not None:
            absmax = absmax * clip
        scale = fp16_scale(absmax)
        levels = nf_levels(self.bits)
        x = Wg / scale
        idx = torch.zeros_like(x)
        above = torch.empty_like(x)
        for mid in ((levels[1:] + levels[:-1]) / 2).tolist():
            idx.add_(torch.gt(x, mid, out=above))  # nearest level = midpoints below x (ties go down)
        return idx, scale, levels

    def quantize(self, W_f: Tensor, clip: Tensor | None = None) -> QTensor:
        """W_f [out, in] float -> QTensor (codes [out, in], scales [out, n_groups])."""
        W, clip = self._prepare(W_f, clip)
        shape = tuple(W.shape)
        idx, scale, _ = self._quant_grouped(W, clip)
        codes = grouping.from_groups(idx, self.group_size, shape).to(torch.uint8)
        return QTensor(codes, scale.squeeze(-1).half(), None, shape, self)  # [R, G, 1] -> [R, G]

    def dequantize(self, q: QTensor) -> Tensor:
        """QTensor -> W_dq [out, in] float32."""
        levels = nf_levels(self.bits)
        vals = grouping.to_groups(levels[q.codes.long()], self.group_size)  # [R, G, w]
        W_dq = vals * q.scales.float().unsqueeze(-1)  # scales [R, G] -> [R, G, 1]
        return grouping.from_groups(W_dq, self.group_size, q.shape)

    def fake_quantize(self, W_f: Tensor, clip: Tensor | None = None) -> Tensor:
        """dequantize(quantize(W_f, clip)) without building codes -> W_dq [out, in] float32."""
        W, clip = self._prepare(W_f, clip)
        idx, scale, levels = self._quant_grouped(W, clip)
        W_dq = torch.take(levels, idx.long()).mul_(scale)
        return grouping.from_groups(W_dq, self.group_size, tuple(W.shape))
