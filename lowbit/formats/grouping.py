"""Group layout shared by every format: how input columns are split into scale groups.

`group_size` convention (used by all formats):
  * g > 0  -- groups of g consecutive input columns; if g does not divide `in` the LAST
              group is ragged (in=576, g=128 -> widths 128,128,128,128,64).
  * g == 0 -- one group per output row ("per channel"; for activations, where rows are
              tokens, this is "per token").
  * g == -1 -- a single group covering the whole tensor ("per tensor").

Grouped layout: a [rows, in] matrix is viewed as [R, G, w] where G is the number of
groups, w the (padded) group width and R = rows (or 1 for per-tensor, with w = rows*in).
"""
from __future__ import annotations

import torch
from torch import Tensor

PER_CHANNEL = 0
PER_TENSOR = -1


def check_group_size(owner: str, group_size: object) -> None:
    """Raise ValueError unless group_size is an int > 0, 0 or -1."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1:
        raise ValueError(
            f"{owner}.group_size must be an int > 0, 0 (per channel) or -1 (per tensor), got {group_size!r}"
        )


def check_bits(owner: str, bits: object, lo: int, hi: int) -> None:
    """Raise ValueError unless bits is an int in lo..hi."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{owner}.bits must be an int in {lo}..{hi}, got {bits!r}")


def n_groups(group_size: int, in_features: int) -> int:
    """Number of scale groups per row (1 for per-channel and per-tensor)."""
    if group_size > 0:
        return -(-in_features // group_size)  # ceil division: the ragged tail is a group
    return 1


def scale_shape(group_size: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale (and zero-point) tensor for a weight of `shape`."""
    out, in_features = shape
    if group_size == PER_TENSOR:
        return (1, 1)
    return (out, n_groups(group_size, in_features))


def group_width(group_size: int, shape: tuple[int, int]) -> int:
    """Width w of one group in the grouped layout."""
    out, in_features = shape
    if group_size > 0:
        return group_size
    if group_size == PER_CHANNEL:
        return in_features
    return out * in_features


def to_groups(W: Tensor, group_size: int, pad: str = "edge") -> Tensor:
    """[rows, in] -> [R, G, w] grouped view (a copy only when the last group is ragged).

    The ragged tail is padded to width w either by repeating the row's LAST column
    (pad="edge": the padding belongs to the last group, so its absmax/min/max -- and hence
    its scale -- come only from its own columns) or with zeros (pad="zero": for sums).
    """
    rows, in_features = W.shape
    if group_size == PER_TENSOR:
        return W.reshape(1, 1, rows * in_features)  # whole tensor is one group
    if group_size == PER_CHANNEL:
        return W.reshape(rows, 1, in_features)  # one group per row
    G = n_groups(group_size, in_features)
    n_pad = G * group_size - in_features
    if n_pad:
        if pad == "edge":
            tail = W[:, -1:].expand(rows, n_pad)
        elif pad == "zero":
            tail = W.new_zeros(rows, n_pad)
        else:
            raise ValueError(f"pad must be 'edge' or 'zero', got {pad!r}")
        W = torch.cat([W, tail], dim=1)
    return W.reshape(rows, G, group_size)  # split columns into G groups of group_size


def from_groups(Wg: Tensor, group_size: int, shape: tuple[int, int]) -> Tensor:
    """[R, G, w] grouped layout -> [out, in], dropping ragged-tail padding."""
    out, in_features = shape
    if group_size == PER_TENSOR:
        return Wg.reshape(out, in_features)  # per-tensor: undo the flattening
    flat = Wg.reshape(Wg.shape[0], -1)  # merge groups back into columns
    return flat[:, :in_features].contiguous()


def group_absmax(Wg: Tensor) -> Tensor:
    """Grouped Wg [R, G, w] -> max |Wg| per group [R, G, 1]; ValueError on NaN / inf."""
    return check_finite(Wg.abs().amax(dim=-1, keepdim=True))


def check_finite(stat: Tensor) -> Tensor:
    """Return a (small) group statistic, raising ValueError if it is NaN or inf.

    amax/amin propagate NaN and inf, so checking the per-group statistic checks the weight.
    """
    if not bool(torch.isfinite(stat).all()):
        raise ValueError("W_f must be finite, got NaN or inf values")
    return stat


def group_sum(X: Tensor, group_size: int) -> Tensor:
    """Sum of X [rows, in] over each group -> [R, G] (per-tensor: [1, 1])."""
    return to_groups(X, group_size, pad="zero").sum(dim=-1)
