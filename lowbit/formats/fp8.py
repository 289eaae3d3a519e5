"""Simulated FP8 (E4M3 / E5M2) with a float32 per-channel or per-tensor scale."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.formats import grouping
from lowbit.formats.base import Format, QTensor

FP8_DTYPES = MappingProxyType({"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2})
FP8_MAX = MappingProxyType({"e4m3": 448.0, "e5m2": 57344.0})  # largest finite values


@dataclass(frozen=True)
class FP8Format(Format):
    """FP8 elements with scale = absmax / fp8_max (times clip), stored float32.

    kind: "e4m3" (torch.float8_e4m3fn, max 448) or "e5m2" (torch.float8_e5m2, max 57344).
    group_size: 0 per output channel, -1 per tensor (FP8 has no group scales).
    Elements are W / scale clamped to +-fp8_max and cast with round-to-nearest-even; the
    codes are the raw uint8 bit patterns of the fp8 values.
    """

    kind: str = "e4m3"
    group_size: int = 0

    family: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        if self.kind not in FP8_DTYPES:
            raise ValueError(f"FP8Format.kind must be one of {tuple(FP8_DTYPES)}, got {self.kind!r}")
        if isinstance(self.group_size, bool) or self.group_size not in (0, -1):
            raise ValueError(f"FP8Format.group_size must be 0 (per channel) or -1 (per tensor), got {self.group_size!r}")

    @property
    def name(self) -> str:
        return f"fp8-{self.kind}-{'ch' if self.group_size == 0 else 'tensor'}"

    @property
    def code_bits(self) -> int:
        return 8

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32

    def quantize(self, W_f: Tensor, clip: Tensor | None = None) -> QTensor:
        """W_f [out, in] float -> QTensor (codes [out, in] fp8 bits, scales [out, 1] or [1, 1])."""
        W, clip = self._prepare(W_f, clip)
        shape = tuple(W.shape)
        fp8_max = FP8_MAX[self.kind]
        Wg = grouping.to_groups(W, self.group_size)  # [out, 1, in] or [1, 1, out*in]
        absmax = grouping.group_absmax(Wg)
        if clip is not None:
            absmax = absmax * clip
        scale = torch.where(absmax > 0, absmax / fp8_max, torch.ones_like(absmax))
        elems = (Wg / scale).clamp_(-fp8_max, fp8_max).to(FP8_DTYPES[self.kind])
        codes = grouping.from_groups(elems.view(torch.uint8), self.group_size, shape)  # raw bits
        return QTensor(codes, scale.squeeze(-1), None, shape, self)  # [R, 1, 1] -> [R, 1]

    def dequantize(self, q: QTensor) -> Tensor:
        """QTensor -> W_dq [out, in] float32 = fp8 value * scale."""
        vals = q.codes.view(FP8_DTYPES[self.kind]).float()
        Vg = grouping.to_groups(vals, self.group_size)  # [out, 1, in] or [1, 1, out*in]
        W_dq = Vg * q.scales.unsqueeze(-1)  # scales [R, 1] -> [R, 1, 1]
        return grouping.from_groups(W_dq, self.group_size, q.shape)
