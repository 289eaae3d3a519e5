"""MXFP4 (OCP Microscaling): E2M1 elements in blocks of 32 sharing one E8M0 power-of-two scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.formats import grouping
from lowbit.formats.base import Format, QTensor

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # index = 3-bit magnitude code
E2M1_EMAX = 2  # exponent of the largest E2M1 normal (6 = 1.5 * 2**2)
E8M0_BIAS = 127
BLOCK = 32


def e2m1_round(m: Tensor) -> Tensor:
    """Magnitudes m >= 0 -> nearest E2M1 magnitude index (integer-valued float32), ties to
    even, saturating at 6. Counts the midpoints below m, float-only for speed."""
    idx = torch.zeros_like(m)
    above = torch.empty_like(m)
    for i in range(len(E2M1_MAGNITUDES) - 1):
        mid = (E2M1_MAGNITUDES[i] + E2M1_MAGNITUDES[i + 1]) / 2
        if (i + 1) % 2 == 0:  # a tie goes up to the even index (even mantissa)
            idx.add_(torch.ge(m, mid, out=above))
        else:
            idx.add_(torch.gt(m, mid, out=above))
    return idx


@dataclass(frozen=True)
class MXFP4Format(Format):
    """MXFP4: blocks of 32 input columns (ragged last block allowed), scale 2**e per block.

    e = floor(log2(absmax_block * clip)) - 2, clamped to [-127, 127], stored as the uint8
    biased exponent e + 127 (E8M0). Elements are W / 2**e rounded to the nearest E2M1 value
    (+-{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even, saturating at +-6). Code = sign << 3 |
    magnitude index (4-bit sign-magnitude; zero is always stored with sign 0).
    """

    family: ClassVar[str] = "mxfp4"

    @property
    def group_size(self) -> int:
        return BLOCK

    @property
    def name(self) -> str:
        return "mxfp4"

    @property
    def code_bits(self) -> int:
        return 4

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8

    @staticmethod
    def _block_exponent(absmax: Tensor) -> Tensor:
        """absmax [R, G, 1] -> shared exponent e (int32) [R, G, 1]."""
        _, exp = torch.frexp(absmax)  # absmax = mant * 2**exp, mant in [0.5, 1): floor(log2) = exp - 1
        e = exp - 1 - E2M1_EMAX
        e = torch.where(absmax > 0, e, torch.full_like(e, -E8M0_BIAS))  # all-zero block
        return e.clamp(-E8M0_BIAS, E8M0_BIAS)

    def _quant_grouped(self, W: Tensor, clip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """W [out, in] -> (magnitude idx [R, G, 32] float, grouped W [R, G, 32], e [R, G, 1])."""
        Wg = grouping.to_groups(W, BLOCK)  # [out, G, 32], ragged tail edge-padded
        absmax = grouping.group_absmax(Wg)
        if clip is not None:
            absmax = absmax * clip
        e = self._block_exponent(absmax)
        scale = torch.ldexp(torch.ones_like(absmax), e)
        return e2m1_round(Wg.abs() / scale), Wg, e

    def quantize(self, W_f: Tensor, clip: Tensor | None = None) -> QTensor:
        """W_f [out, in] float -> QTensor (codes [out, in] 4-bit, scales [out, n_blocks] uint8)."""
        W, clip = self._prepare(W_f, clip)
        shape = tuple(W.shape)
        idx, Wg, e = self._quant_grouped(W, clip)
        negative = (Wg < 0) & (idx > 0)  # zero is stored with sign 0
        codes_g = idx.to(torch.uint8) | (negative.to(torch.uint8) << 3)  # sign above 3 magnitude bits
        codes = grouping.from_groups(codes_g, BLOCK, shape)
        scales = (e.squeeze(-1) + E8M0_BIAS).to(torch.uint8)  # [R, G, 1] -> [R, G], biased
        return QTensor(codes, scales, None, shape, self)

    def dequantize(self, q: QTensor) -> Tensor:
        """QTensor -> W_dq [out, in] float32 = 2**e * E2M1 value (exact)."""
        mags = torch.tensor(E2M1_MAGNITUDES)[(q.codes & 7).long()]
        vals = torch.where(q.codes >= 8, -mags, mags)
        Vg = grouping.to_groups(vals, BLOCK)  # [out, G, 32]
        e = q.scales.to(torch.int32).unsqueeze(-1) - E8M0_BIAS  # [R, G] -> [R, G, 1]
        W_dq = Vg * torch.ldexp(torch.ones(e.shape), e)
        return grouping.from_groups(W_dq, BLOCK, q.shape)

    def fake_quantize(self, W_f: Tensor, clip: Tensor | None = None) -> Tensor:
        """dequantize(quantize(W_f, clip)) without building codes -> W_dq [out, in] float32."""
        W, clip = self._prepare(W_f, clip)
        idx, Wg, e = self._quant_grouped(W, clip)
        mags = torch.take(torch.tensor(E2M1_MAGNITUDES), idx.long())
        W_dq = torch.copysign(mags, Wg).mul_(torch.ldexp(torch.ones(e.shape), e))  # zero may be -0.0
        return grouping.from_groups(W_dq, BLOCK, tuple(W.shape))
