"""QTensor (a quantized weight) and the Format base class shared by every format family."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.formats import grouping
from lowbit.formats.packing import pack_bits, packed_row_bytes, unpack_bits

FP16_MAX = 65504.0


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized [out, in] weight, codes UNPACKED.

    codes:  [out, in] uint8 unsigned codes (fmt.codes_shape: a GGUF type keeps its blocks' bytes here).
    scales: fmt.scale_shape(shape) ([out, n_groups] or [1, 1]), dtype fmt.scale_dtype.
    zeros:  same shape as scales, uint8 integer zero-points (asymmetric int only), else None.
    shape:  (out, in).
    fmt:    the Format that produced it and dequantizes it.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
    shape: tuple[int, int]
    fmt: "Format"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) != 2:
            raise ValueError(f"QTensor.shape must be (out, in), got {shape}")
        if not isinstance(self.fmt, Format):
            raise ValueError(f"QTensor.fmt must be a Format, got {type(self.fmt).__name__}")
        c_shape = self.fmt.codes_shape(shape)
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != c_shape:
            raise ValueError(f"QTensor.codes must be uint8 {c_shape}, got {self.codes.dtype} {tuple(self.codes.shape)}")
        s_shape = self.fmt.scale_shape(shape)
        if self.scales.dtype != self.fmt.scale_dtype or tuple(self.scales.shape) != s_shape:
            raise ValueError(
                f"QTensor.scales must be {self.fmt.scale_dtype} {s_shape}, got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if self.fmt.has_zeros != (self.zeros is not None):
            raise ValueError(f"QTensor.zeros must be {'a tensor' if self.fmt.has_zeros else 'None'} for {self.fmt.name}")
        if self.zeros is not None and (self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != s_shape):
            raise ValueError(f"QTensor.zeros must be uint8 {s_shape}, got {self.zeros.dtype} {tuple(self.zeros.shape)}")


def fp16_scale(scale: Tensor) -> Tensor:
    """Round float32 scales UP to the next float16 value; returns float32 holding fp16 values.

    Rounding up (never down) keeps the stored grid covering the group's full range, so
    |W_f - W_dq| <= scale/2 holds exactly for the stored scale. Scales of 0 (all-zero
    groups) become 1; scales are capped at the float16 maximum.
    """
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(max=FP16_MAX)
    s16 = scale.to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    s16 = torch.where(s16.float() < scale, up, s16)  # nearest fp16 was below: bump up one ulp
    return s16.float()


class Format(ABC):
    """Base of the format families. Subclasses are frozen dataclasses with a `group_size`."""

    family: ClassVar[str]
    group_size: int

    # --- per-family facts -----------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str:
        """Short identifier, e.g. 'int4-g64-sym'."""

    @property
    @abstractmethod
    def code_bits(self) -> int:
        """Bits per stored code (and per packed zero-point)."""

    @property
    @abstractmethod
    def scale_dtype(self) -> torch.dtype:
        """dtype the scales are stored in."""

    @property
    def has_zeros(self) -> bool:
        """Whether QTensor.zeros is present."""
        return False

    # --- the math -------------------------------------------------------------------
    @abstractmethod
    def quantize(self, W_f: Tensor, clip: Tensor | None = None) -> QTensor:
        """W_f [out, in] float -> QTensor; clip [out, n_groups] shrink factors in (0, 1]."""

    @abstractmethod
    def dequantize(self, q: QTensor) -> Tensor:
        """QTensor -> W_dq [out, in] float32."""

    def fake_quantize(self, W_f: Tensor, clip: Tensor | None = None) -> Tensor:
        """dequantize(quantize(W_f, clip)) -> W_dq [out, in] float32."""
        return self.dequantize(self.quantize(W_f, clip))

    # --- layout ---------------------------------------------------------------------
    def n_groups(self, in_features: int) -> int:
        """Scale groups per row (1 for per-channel and per-tensor)."""
        return grouping.n_groups(self.group_size, in_features)

    def codes_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of QTensor.codes for a weight of `shape` (one code per weight)."""
        return shape

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of QTensor.scales for a weight of `shape`."""
        return grouping.scale_shape(self.group_size, shape)

    def to_dict(self) -> dict:
        """JSON-safe description; lowbit.formats.format_from_dict inverts it."""
        return {"family": self.family, **dataclasses.asdict(self)}

    def _prepare(self, W_f: Tensor, clip: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate inputs; returns W [out, in] float32 and clip [R, G, 1] float32 or None."""
        if not isinstance(W_f, Tensor) or W_f.dim() != 2 or not W_f.is_floating_point():
            raise ValueError(f"W_f must be a 2-D float tensor [out, in], got {getattr(W_f, 'shape', W_f)!r}")
        W = W_f.detach().float()
        if clip is None:
            return W, None
        s_shape = self.scale_shape(tuple(W.shape))
        try:
            c = torch.broadcast_to(clip.detach().float(), s_shape)
        except RuntimeError:
            raise ValueError(f"clip must broadcast to {s_shape}, got {tuple(clip.shape)}") from None
        if c.numel() and not bool(((c > 0) & (c <= 1)).all()):
            raise ValueError("clip values must lie in (0, 1]")
        return W, c.unsqueeze(-1)  # [R, G] -> [R, G, 1] to broadcast over a group

    # --- storage --------------------------------------------------------------------
    def pack(self, q: QTensor) -> dict[str, Tensor]:
        """Tensors stored on disk: 'codes' bit-packed row-wise, 'scales', 'zeros' packed."""
        out = {"codes": pack_bits(q.codes, self.code_bits), "scales": q.scales.contiguous()}
        if q.zeros is not None:
            out["zeros"] = pack_bits(q.zeros, self.code_bits)
        return out

    def unpack(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> QTensor:
        """Exact inverse of pack."""
        expected = {"codes", "scales"} | ({"zeros"} if self.has_zeros else set())
        if set(tensors) != expected:
            raise ValueError(f"tensors must have keys {sorted(expected)}, got {sorted(tensors)}")
        shape = (int(shape[0]), int(shape[1]))
        codes = unpack_bits(tensors["codes"], self.code_bits, shape[1])
        zeros = None
        if self.has_zeros:
            zeros = unpack_bits(tensors["zeros"], self.code_bits, self.scale_shape(shape)[1])
        return QTensor(codes, tensors["scales"], zeros, shape, self)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Total bits stored by pack() for a weight of `shape` (row padding included)."""
        out, in_features = shape
        s_rows, s_cols = self.scale_shape(shape)
        bits = 8 * out * packed_row_bytes(in_features, self.code_bits)
        bits += s_rows * s_cols * 8 * torch.empty((), dtype=self.scale_dtype).element_size()
        if self.has_zeros:
            bits += 8 * s_rows * packed_row_bytes(s_cols, self.code_bits)
        return bits
