"""Pure tensor functions that re-express lowbit's integer weights on the grids other engines read.

lowbit's IntFormat stores, per weight [out, in]: unsigned codes u in [0, 2^b - 1], float16 scales
[out, G] and (asymmetric) unsigned integer zero-points z [out, G]; W_dq = s · (u − z) with
z = 2^(b−1) for symmetric formats. Groups run along the input dimension and the last one may be
ragged (576 columns in groups of 128 = 4×128 + 64); group 0 is per output channel, −1 per tensor.

The engines (compressed-tensors, GPTQ) read groups of one width that divides every row. A ragged
grid is re-expressed exactly by cutting every group into sub-groups of g' = gcd(g, in, …) columns
that repeat its scale and zero-point; a per-tensor scale is repeated per output channel. Codes
never change, so W_dq is unchanged bit for bit; only the scale storage grows.

Packing into int32 words is dense and little-endian in every target here: code i of a packed
line occupies bits [i·b, (i+1)·b) of the line's bit stream and stream bit k lives in word k // 32
at bit k % 32 (for b = 4: 8 codes per word, the first in the low nibble; for b = 3, 32 codes in
3 words with codes 10 and 21 split across words — GPTQ's 3-bit layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import IntFormat, QTensor
from ..formats.packing import pack_int32, unpack_int32  # noqa: F401  (moved there; re-exported)

PER_CHANNEL = 0


@dataclass(frozen=True, eq=False)
class IntGrid:
    """An integer weight on a regular grid: every group has `group_size` columns.

    codes:  [out, in] uint8 unsigned codes u.
    scales: [out, G] float16.
    zeros:  [out, G] uint8 unsigned zero-points z; for symmetric weights the constant 2^(b−1).
    group_size: > 0 dividing `in` (G = in / group_size), or 0 per output channel (G = 1).
    W_dq = scales · (codes − zeros), group by group.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    symmetric: bool
    group_size: int

    def __post_init__(self) -> None:
        out, in_features = self.codes.shape
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"IntGrid.codes must be uint8, got {self.codes.dtype}")
        if self.group_size < 0 or (self.group_size and in_features % self.group_size):
            raise ValueError(f"IntGrid.group_size must be 0 or divide in={in_features}, got {self.group_size}")
        n_groups = in_features // self.group_size if self.group_size else 1
        if tuple(self.scales.shape) != (out, n_groups) or self.scales.dtype != torch.float16:
            raise ValueError(f"IntGrid.scales must be float16 {(out, n_groups)}, got "
                             f"{self.scales.dtype} {tuple(self.scales.shape)}")
        if tuple(self.zeros.shape) != (out, n_groups) or self.zeros.dtype != torch.uint8:
            raise ValueError(f"IntGrid.zeros must be uint8 {(out, n_groups)}, got "
                             f"{self.zeros.dtype} {tuple(self.zeros.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group_index(self) -> Tensor:
        """g_idx [in] int32: the group of every input column."""
        in_features = self.shape[1]
        if not self.group_size:
            return torch.zeros(in_features, dtype=torch.int32)
        return torch.arange(in_features, dtype=torch.int32) // self.group_size

    def dequantize(self) -> Tensor:
        """W_dq [out, in] float32, computed as lowbit computes it (float32 (u − z) · s)."""
        idx = self.group_index.long()
        codes = self.codes.float()
        return (codes - self.zeros.float()[:, idx]) * self.scales.float()[:, idx]


def grid_group_size(fmt: IntFormat, in_features: list[int]) -> int:
    """The regular group width that represents `fmt` on rows of every width in `in_features`.

    g > 0: gcd(g, every in) — g itself when it divides every row. 0 and −1 stay per channel (0).
    """
    if fmt.group_size <= 0:
        return PER_CHANNEL
    return math.gcd(fmt.group_size, *in_features)


def to_grid(q: QTensor, group_size: int) -> IntGrid:
    """Re-express an integer QTensor on a regular grid of `group_size` columns (0: per channel).

    `group_size` must divide q's own group width (or be 0 for per-channel/per-tensor formats).
    """
    fmt = q.fmt
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"to_grid takes integer formats, got {fmt.name}")
    out, in_features = q.shape
    zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, 1 << (fmt.bits - 1), dtype=torch.uint8)
    if fmt.group_size == -1:                       # one scale for the tensor -> repeated per row
        if group_size != PER_CHANNEL:
            raise ValueError(f"a per-tensor format maps to per-channel (0), got group_size {group_size}")
        return IntGrid(q.codes, q.scales.expand(out, 1).contiguous(), zeros.expand(out, 1).contiguous(),
                       fmt.bits, fmt.symmetric, PER_CHANNEL)
    if fmt.group_size == 0:
        if group_size != PER_CHANNEL:
            raise ValueError(f"a per-channel format maps to per-channel (0), got group_size {group_size}")
        return IntGrid(q.codes, q.scales, zeros, fmt.bits, fmt.symmetric, PER_CHANNEL)
    if group_size <= 0 or fmt.group_size % group_size or in_features % group_size:
        raise ValueError(f"group_size {group_size} must divide the format's {fmt.group_size} and in={in_features}")
    # sub-group j of the row lies inside lowbit group (j * group_size) // fmt.group_size
    owner = torch.arange(in_features // group_size) * group_size // fmt.group_size
    return IntGrid(q.codes, q.scales[:, owner].contiguous(), zeros[:, owner].contiguous(),
                   fmt.bits, fmt.symmetric, group_size)


def regrid(fmt: IntFormat, in_features: list[int]) -> tuple[int, list[str]]:
    """grid_group_size plus the notes a user should read when the written layout differs."""
    group = grid_group_size(fmt, in_features)
    notes = []
    if fmt.group_size > 0 and group != fmt.group_size:
        notes.append(f"group {fmt.group_size} does not divide every row: written as group {group} with each "
                     "scale repeated (exact, larger scale storage)")
    if fmt.group_size == -1:
        notes.append("per-tensor scale written per channel (repeated; exact)")
    return group, notes
