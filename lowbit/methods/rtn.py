"""Round-to-nearest (RTN) weight quantization, optionally with a per-group MSE clip search."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import Format, QTensor
from lowbit.formats import grouping

CLIP_MODES = ("none", "mse")
CHUNK_ELEMENTS = 1 << 18  # rows per search chunk are sized to keep ~1 MiB float32 temporaries


@dataclass(frozen=True)
class RtnConfig:
    """RTN options.

    clip: "none" (plain RTN) or "mse" (per-group shrink factor from mse_clip).
    clip_grid: number of shrink factors tried, >= 1; the grid is linspace(1.0, clip_min, clip_grid).
    clip_min: smallest shrink factor, in (0, 1].
    clip_norm: exponent p of the searched error sum |W_f - W_dq|**p, > 0. 2.4 (the GPTQ/AWQ
        grid-search default) weights large errors a little more than plain MSE (2.0).
    """

    clip: str = "none"
    clip_grid: int = 20
    clip_min: float = 0.5
    clip_norm: float = 2.4

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise ValueError(f"RtnConfig.clip must be one of {CLIP_MODES}, got {self.clip!r}")
        if isinstance(self.clip_grid, bool) or not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ValueError(f"RtnConfig.clip_grid must be an int >= 1, got {self.clip_grid!r}")
        if not _is_number(self.clip_min) or not 0 < self.clip_min <= 1:
            raise ValueError(f"RtnConfig.clip_min must be in (0, 1], got {self.clip_min!r}")
        if not _is_number(self.clip_norm) or not 0 < self.clip_norm < float("inf"):
            raise ValueError(f"RtnConfig.clip_norm must be a finite number > 0, got {self.clip_norm!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def group_error(W_f: Tensor, W_dq: Tensor, group_size: int, norm: float) -> Tensor:
    """Per-group error sum |W_f - W_dq|**norm: [out, in] x2 -> [out, n_groups] (or [1, 1])."""
    return _group_error_(W_f.float(), W_dq.float().clone(), group_size, norm)


def _group_error_(W: Tensor, W_dq: Tensor, group_size: int, norm: float) -> Tensor:
    """group_error that overwrites W_dq with the error (saves allocations in the search)."""
    W_e = W_dq.sub_(W).abs_()
    if norm == 2.0:
        W_e.square_()
    elif norm != 1.0:
        W_e.log_().mul_(norm).exp_()  # |e|**norm; log(0) = -inf -> exp -> 0
    return grouping.group_sum(W_e, group_size)


def _search_rows(W: Tensor, fmt: Format, factors: list[float], norm: float) -> Tensor:
    """Best factor per group for the rows W [rows, in] -> [R, G] (ties keep the larger factor)."""
    shape = fmt.scale_shape(tuple(W.shape))
    best_f = torch.full(shape, factors[0])
    best_e = None
    for f in factors:
        clip = torch.full(shape, f)
        err = _group_error_(W, fmt.fake_quantize(W, clip), fmt.group_size, norm)
        if best_e is None:
            best_e = err
            continue
        better = err < best_e
        best_e = torch.where(better, err, best_e)
        best_f = torch.where(better, clip, best_f)
    return best_f


def mse_clip(W_f: Tensor, fmt: Format, grid: int = 20, clip_min: float = 0.5, norm: float = 2.4) -> Tensor:
    """Per-group shrink factor minimising sum |W_f - W_dq|**norm -> [out, n_groups] ([1, 1] per tensor).

    Tries linspace(1.0, clip_min, grid) (1.0 first, so the result never does worse than no
    clip). Each group's error depends only on its own factor, so every factor is evaluated
    for all groups at once and the argmin is taken per group. Rows are processed in chunks
    of about CHUNK_ELEMENTS weights (not for per-tensor formats, whose one scale spans all rows).
    """
    RtnConfig(clip="mse", clip_grid=grid, clip_min=clip_min, clip_norm=norm)  # validates ranges
    if W_f.dim() != 2:
        raise ValueError(f"W_f must be 2-D [out, in], got shape {tuple(W_f.shape)}")
    W = W_f.detach().float()
    out, in_features = W.shape
    factors = torch.linspace(1.0, clip_min, grid).tolist()
    if fmt.scale_shape((out, in_features))[0] != out:  # per-tensor: one group over all rows
        return _search_rows(W, fmt, factors, norm)
    rows = max(1, CHUNK_ELEMENTS // max(in_features, 1))
    parts = [_search_rows(W[i : i + rows], fmt, factors, norm) for i in range(0, out, rows)]
    return torch.cat(parts, dim=0)


def rtn(W_f: Tensor, fmt: Format, config: RtnConfig = RtnConfig()) -> QTensor:
    """Quantize W_f [out, in] by round-to-nearest in `fmt`, with an MSE clip if configured."""
    if config.clip == "none":
        return fmt.quantize(W_f)
    clip = mse_clip(W_f, fmt, config.clip_grid, config.clip_min, config.clip_norm)
    return fmt.quantize(W_f, clip)
