"""Activation formats: how a linear's input x [tokens, in] is quantized at run time.

Unlike a weight, an activation is not known ahead of time: its scale is either computed from
the tensor itself on every forward ("dynamic": per token, per group of input columns within a
token, or one for the whole tensor) or fixed from calibration ("static": one scale per tensor,
from the calibration inputs' absmax or a percentile of |x|).

Symmetric: codes c = clamp(round(x / s), −qmax, qmax), qmax = 2^(b−1) − 1, s = clip·absmax / qmax
(the int8 convention of LLM.int8(), SmoothQuant and vLLM: −128 is never used).
Asymmetric: u = clamp(round(x / s) + z, 0, 2^b − 1), s = clip·(max − min) / (2^b − 1) with 0
kept representable, z = round(−min / s).
`outlier_threshold` T (LLM.int8()): input columns holding any |x| ≥ T in this forward are taken
out of the quantized product and multiplied in float (nn.act_linear); the rest is quantized
as above.

This file is the reference: nn.act_linear's int8 kernel is tested equal to it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

GRANULARITIES = ("token", "tensor", "static", "group")
CALIBRATIONS = ("absmax", "percentile")


@dataclass(frozen=True)
class ActFormat:
    """bits 2..8; granularity: "token" (dynamic, one scale per token), "tensor" (dynamic, one
    scale per forward), "static" (one calibrated scale per tensor), "group" (dynamic, per token
    and group of `group_size` input columns); calibration (static only): "absmax" or
    "percentile" of |x|; clip in (0, 1] shrinks the range; outlier_threshold > 0 or None."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "token"
    group_size: int = 0
    calibration: str = "absmax"
    percentile: float = 99.99
    clip: float = 1.0
    outlier_threshold: float | None = None

    family = "act"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"activation symmetric must be True or False, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"activation granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity == "group") != (isinstance(self.group_size, int) and self.group_size > 0):
            raise ValueError("activation group_size > 0 goes with granularity 'group' (and only with it), "
                             f"got {self.granularity!r} with group_size {self.group_size!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"activation calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"activation percentile must be in (50, 100], got {self.percentile!r}")
        if not 0 < self.clip <= 1:
            raise ValueError(f"activation clip must be in (0, 1], got {self.clip!r}")
        if self.static and not self.symmetric:
            raise ValueError("static activation scales are symmetric (one scale, no zero-point)")
        t = self.outlier_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise ValueError(f"outlier threshold must be a number > 0, got {t!r}")

    @property
    def static(self) -> bool:
        return self.granularity == "static"

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        name = f"a{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"
        if self.static and self.calibration == "percentile":
            name += f"-p{self.percentile:g}"
        if self.clip != 1.0:
            name += f"-clip{self.clip:g}"
        if self.outlier_threshold is not None:
            name += f"-split{self.outlier_threshold:g}"
        return name

    def to_dict(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self)}

    def with_threshold(self, threshold: float | None) -> "ActFormat":
        return dataclasses.replace(self, outlier_threshold=threshold)


_NAME = re.compile(r"^a(\d)-(token|tensor|static|g\d+)-(sym|asym)(?:-p([\d.]+))?(?:-clip([\d.]+))?"
                   r"(?:-split([\d.]+))?$")


def act_format_from_name(name: str) -> ActFormat:
    """"a8-token-sym", "a8-static-sym-p99.99", "a4-token-asym-clip0.9", "a8-token-sym-split6", "a4-g128-sym"."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"unknown activation format {name!r}: use a<b>-token|tensor|static|g<N>-sym|asym"
                         "[-p<percentile>][-clip<c>][-split<threshold>] (a8-token-sym, a8-static-sym)")
    bits, gran, kind, pct, clip, split = m.groups()
    group = int(gran[1:]) if gran.startswith("g") else 0
    return ActFormat(int(bits), kind == "sym", "group" if group else gran, group,
                     "percentile" if pct else "absmax", float(pct) if pct else 99.99,
                     float(clip) if clip else 1.0, float(split) if split else None)


def act_format_from_dict(d: dict) -> ActFormat:
    if not isinstance(d, dict) or d.get("family") != "act":
        raise ValueError(f"not an activation format: {d!r}")
    try:
        return ActFormat(**{k: v for k, v in d.items() if k != "family"})
    except TypeError as e:
        raise ValueError(f"bad activation format fields: {e}") from None


def _grouped(x: Tensor, fmt: ActFormat) -> Tensor:
    """x [T, in] -> the view its scales are taken over: [T, 1, in] per token, [1, 1, T·in] per
    tensor, [T, G, g] per group."""
    T, n = x.shape
    if fmt.granularity == "group":
        if n % fmt.group_size:
            raise ValueError(f"activation groups of {fmt.group_size} do not divide {n} input columns")
        return x.reshape(T, n // fmt.group_size, fmt.group_size)    # [T, in] -> [T, G, g]
    if fmt.granularity in ("tensor", "static"):
        return x.reshape(1, 1, T * n)                                # [T, in] -> [1, 1, T·in]
    return x.unsqueeze(1)                                            # [T, in] -> [T, 1, in]


def act_params(x: Tensor, fmt: ActFormat, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Scale and zero-point (asymmetric) of x [T, in] in the grouped layout of _grouped
    ([T, 1, 1], [1, 1, 1] or [T, G, 1]), float32. static_scale: the calibrated scale (static)."""
    if fmt.static:
        if static_scale is None:
            raise ValueError(f"activation format {fmt.name} needs its calibrated scale")
        return static_scale.float().reshape(1, 1, 1), None
    xg = _grouped(x.float(), fmt)
    if fmt.symmetric:
        scale = xg.abs().amax(-1, keepdim=True) * (fmt.clip / fmt.qmax)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None   # an all-zero row: any scale
    hi = xg.amax(-1, keepdim=True).clamp(min=0) * fmt.clip
    lo = xg.amin(-1, keepdim=True).clamp(max=0) * fmt.clip
    scale = (hi - lo) / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, fmt.qmax)


def quantize_act(x: Tensor, fmt: ActFormat, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [T, in] -> (codes [T, in] float32 holding integers: signed c when symmetric, unsigned u
    when not; scale and zero in the grouped layout)."""
    scale, zero = act_params(x, fmt, static_scale)
    xg = _grouped(x.float(), fmt)
    if zero is None:
        codes = (xg / scale).round_().clamp_(-fmt.qmax, fmt.qmax)
    else:
        codes = (xg / scale).round_().add_(zero).clamp_(0, fmt.qmax)
    return codes.reshape(x.shape), scale, zero      # grouped -> [T, in]


def dequantize_act(codes: Tensor, scale: Tensor, zero: Tensor | None, fmt: ActFormat) -> Tensor:
    """Inverse of quantize_act -> x_dq [T, in] float32."""
    cg = _grouped(codes, fmt)
    x = (cg - zero) * scale if zero is not None else cg * scale
    return x.reshape(codes.shape)                   # grouped -> [T, in]


def fake_quantize_act(x: Tensor, fmt: ActFormat, static_scale: Tensor | None = None) -> Tensor:
    """dequantize(quantize(x)) for x [..., in], in x's dtype (the simulated path)."""
    x2 = x.reshape(-1, x.shape[-1])                  # [..., in] -> [T, in]
    return dequantize_act(*quantize_act(x2, fmt, static_scale), fmt).reshape(x.shape).to(x.dtype)


def static_scale(fmt: ActFormat, absmax: float | None = None, rows: Tensor | None = None) -> Tensor:
    """The calibrated scale [1] of a static format: clip · (absmax, or the fmt.percentile-th
    percentile of |rows|) / qmax."""
    if fmt.calibration == "absmax":
        if absmax is None:
            raise ValueError("a static absmax scale needs the calibration inputs' absmax")
        value = float(absmax)
    else:
        if rows is None or rows.numel() == 0:
            raise ValueError("a static percentile scale needs calibration input rows")
        flat = rows.float().abs().reshape(-1)
        k = min(flat.numel(), max(1, math.ceil(flat.numel() * fmt.percentile / 100)))
        value = float(flat.kthvalue(k).values)
    value = value if value > 0 else 1.0
    return torch.tensor([value * fmt.clip / fmt.qmax], dtype=torch.float32)
