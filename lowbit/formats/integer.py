"""Uniform integer formats (symmetric / asymmetric, grouped / per-channel / per-tensor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.formats import grouping
from lowbit.formats.base import Format, QTensor, fp16_scale

SCALE_RULES = ("absmax", "absmax_half", "signed")


@dataclass(frozen=True)
class IntFormat(Format):
    """b-bit uniform integer quantization with float16 scales.

    bits: 2..8.
    group_size: > 0 groups of consecutive input columns (ragged last group allowed);
        0 per output channel (one scale per row -- for activations with tokens as rows this
        is "per token"); -1 one scale for the whole tensor.
    symmetric: True -> code c = clamp(round(w / s), lo, qmax), stored u = c + 2**(bits-1);
        False -> u = clamp(round(w / s) + z, 0, 2**bits - 1) with an integer zero-point z
        and s = (max - min) / (2**bits - 1), max = max(w.max, 0), min = min(w.min, 0).
    scale_rule (symmetric only): "absmax" s = absmax / qmax, codes in [-qmax, qmax]
        (qmax = 2**(bits-1) - 1); "absmax_half" s = absmax / (qmax + 0.5), codes in
        [-qmax-1, qmax] (the compressed-tensors convention; -qmax-1 is reached only by w = -absmax,
        so in effect a clip of qmax / (qmax + 0.5)); "signed" s = -m / (qmax + 1) with m the
        group's entry of largest magnitude, sign included (llama.cpp's Q4_0 rule): m lands on
        code -qmax-1, so all 2**bits codes are used, qmax + 1 levels on m's side and qmax on the
        other; scales may be negative.
    Scales are rounded up to float16 before the codes are computed (see fp16_scale).
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int = 128
    scale_rule: str = "absmax"

    family: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        grouping.check_bits("IntFormat", self.bits, 2, 8)
        grouping.check_group_size("IntFormat", self.group_size)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"IntFormat.symmetric must be True or False, got {self.symmetric!r}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"IntFormat.scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.scale_rule != "absmax" and not self.symmetric:
            raise ValueError(f"IntFormat.scale_rule {self.scale_rule!r} needs symmetric=True, got symmetric=False")

    @property
    def name(self) -> str:
        g = {0: "ch", -1: "tensor"}.get(self.group_size, f"g{self.group_size}")
        kind = "sym" if self.symmetric else "asym"
        suffix = {"absmax": "", "absmax_half": "-half", "signed": "-signed"}[self.scale_rule]
        return f"int{self.bits}-{g}-{kind}{suffix}"

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float16

    @property
    def has_zeros(self) -> bool:
        return not self.symmetric

    @property
    def _offset(self) -> int:
        """Symmetric code offset: stored u = c + 2**(bits-1)."""
        return 1 << (self.bits - 1)

    def _params(self, Wg: Tensor, clip: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Grouped Wg [R, G, w] -> scale [R, G, 1] (fp16 values) and zero [R, G, 1] or None."""
        qmax = self._offset - 1
        if self.symmetric:
            absmax = grouping.group_absmax(Wg)
            if clip is not None:
                absmax = absmax * clip
            if self.scale_rule == "signed":
                # the sign of the largest-magnitude entry; -1 maps it onto code -(qmax + 1)
                m = Wg.gather(-1, Wg.abs().argmax(dim=-1, keepdim=True))
                sign = torch.where(m > 0, -1.0, 1.0)
                return sign * fp16_scale(absmax / (qmax + 1)), None
            denom = qmax + 0.5 if self.scale_rule == "absmax_half" else qmax
            return fp16_scale(absmax / denom), None
        hi = grouping.check_finite(Wg.amax(dim=-1, keepdim=True)).clamp(min=0)  # keep 0 representable
        lo = grouping.check_finite(Wg.amin(dim=-1, keepdim=True)).clamp(max=0)
        if clip is not None:
            hi, lo = hi * clip, lo * clip
        n_levels = (1 << self.bits) - 1
        scale = fp16_scale((hi - lo) / n_levels)
        zero = torch.round(-lo / scale).clamp(0, n_levels)
        return scale, zero

    def _encode(self, Wg: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
        """Grouped unsigned codes W_qg [R, G, w] (integer-valued float32, a new tensor)."""
        qmax = self._offset - 1
        W_qg = Wg / scale
        if zero is None:
            lo = -qmax if self.scale_rule == "absmax" else -qmax - 1
            return W_qg.round_().clamp_(lo, qmax).add_(self._offset)
        return W_qg.round_().add_(zero).clamp_(0, (1 << self.bits) - 1)

    def _decode_(self, W_qg: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
        """In place: grouped codes W_qg [R, G, w] -> W_dq [R, G, w] = scale * (W_q - z)."""
        z = self._offset if zero is None else zero
        return W_qg.sub_(z).mul_(scale)

    def quantize(self, W_f: Tensor, clip: Tensor | None = None) -> QTensor:
        """W_f [out, in] float -> QTensor (codes [out, in], scales/zeros [out, n_groups])."""
        W, clip = self._prepare(W_f, clip)
        shape = tuple(W.shape)
        Wg = grouping.to_groups(W, self.group_size)  # [R, G, w], ragged tail edge-padded
        scale, zero = self._params(Wg, clip)
        W_q = grouping.from_groups(self._encode(Wg, scale, zero), self.group_size, shape)  # codes
        zeros = None if zero is None else zero.squeeze(-1).to(torch.uint8)  # [R, G, 1] -> [R, G]
        scales = scale.squeeze(-1).half()  # [R, G, 1] -> [R, G], exact: already fp16 values
        return QTensor(W_q.to(torch.uint8), scales, zeros, shape, self)

    def dequantize(self, q: QTensor) -> Tensor:
        """QTensor -> W_dq [out, in] float32."""
        W_qg = grouping.to_groups(q.codes.float(), self.group_size)  # [R, G, w]
        scale = q.scales.float().unsqueeze(-1)  # [R, G] -> [R, G, 1]
        zero = None if q.zeros is None else q.zeros.float().unsqueeze(-1)  # [R, G] -> [R, G, 1]
        return grouping.from_groups(self._decode_(W_qg, scale, zero), self.group_size, q.shape)

    def fake_quantize(self, W_f: Tensor, clip: Tensor | None = None) -> Tensor:
        """dequantize(quantize(W_f, clip)) without building codes -> W_dq [out, in] float32."""
        W, clip = self._prepare(W_f, clip)
        Wg = grouping.to_groups(W, self.group_size)  # [R, G, w]
        scale, zero = self._params(Wg, clip)
        W_dq = self._decode_(self._encode(Wg, scale, zero), scale, zero)
        return grouping.from_groups(W_dq, self.group_size, tuple(W.shape))
