"""Fold per-input-channel scales s into a linear group: the group's input becomes x / s and each
linear's weight W · diag(s), so every output is unchanged (in exact arithmetic).

Where x / s is made depends on the group's source (ArchSpec.groups):
  * a norm: y = x̂ · (offset + w) (+ b)  ->  w' = (offset + w) / s - offset, b' = b / s
    (offset 0 for RMSNorm/LayerNorm, 1 for Gemma's RMSNorm, which computes x̂ · (1 + w));
  * a linear (v -> o, up -> down): its output rows (and bias) are divided by s. Under
    grouped-query attention o_proj's input is the v heads repeated once per query head in the
    group: channel (h, d) of o's input is channel (h // n_rep, d) of v's output. A scale can
    only be folded into v if it is equal across those repeats ("tied"); tie_to_source makes
    per-channel statistics tied, source_scales checks and reduces tied scales.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.models.specs import LinearGroup


def _gqa_view(t: Tensor, source_width: int, head_dim: int | None) -> Tensor:
    """t [in] (o_proj's input, n_rep repeats of source_width) -> [kv, n_rep, head_dim]."""
    width = t.shape[0]
    if head_dim is None or width % source_width or source_width % head_dim:
        raise ValueError(f"cannot map {width} input channels onto a source of {source_width} output "
                         f"channels (head_dim {head_dim})")
    kv = source_width // head_dim
    return t.view(kv, width // source_width, head_dim)  # (h, d) with h = j * n_rep + r -> [j, r, d]


def tie_to_source(x: Tensor, source_width: int, head_dim: int | None = None, reduce: str = "mean") -> Tensor:
    """Per-channel statistic x [in] of a linear-sourced group -> the same, reduced ("mean" or
    "max") over GQA repeats so that scales derived from it fold into the source (unchanged
    when no GQA)."""
    if x.shape[0] == source_width:
        return x
    xv = _gqa_view(x, source_width, head_dim)
    r = xv.mean(dim=1, keepdim=True) if reduce == "mean" else xv.amax(dim=1, keepdim=True)
    return r.expand_as(xv).reshape(-1)  # [kv, 1, hd] -> [kv, n_rep, hd] -> [in]


def source_scales(s: Tensor, source_width: int, head_dim: int | None = None) -> Tensor:
    """Scales s [in] of a group's input -> the scales [source_width] of the source's output rows.

    Raises ValueError when s is not tied across GQA repeats (it could not be folded exactly).
    """
    if s.shape[0] == source_width:
        return s
    sv = _gqa_view(s, source_width, head_dim)
    if not torch.equal(sv, sv[:, :1].expand_as(sv)):
        raise ValueError("scales of a GQA-repeated input must be equal across the repeats of each "
                         "kv channel (use tie_to_source)")
    return sv[:, 0].reshape(-1)  # [kv, hd] -> [kv * hd]


@torch.no_grad()
def fold_scales(layer: torch.nn.Module, group: LinearGroup, s: Tensor, *, norm_offset: float = 0.0,
                head_dim: int | None = None) -> None:
    """In place: the input of `group` (inside decoder `layer`) becomes x / s and its linears
    W · diag(s). s [in] > 0. Parameters keep their dtype; the arithmetic is float64."""
    s = s.detach().double()
    if s.dim() != 1 or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("scales must be a finite, positive 1-D tensor")
    linears = [layer.get_submodule(name) for name in group.linears]
    for name, linear in zip(group.linears, linears):
        if linear.weight.shape[1] != s.shape[0]:
            raise ValueError(f"{name} has {linear.weight.shape[1]} input channels, scales have {s.shape[0]}")
    source = layer.get_submodule(group.source)
    if group.source_kind == "norm":
        w = source.weight
        if w.shape[0] != s.shape[0]:
            raise ValueError(f"{group.source} has {w.shape[0]} channels, scales have {s.shape[0]}")
        w.copy_(((norm_offset + w.double()) / s - norm_offset).to(w.dtype))
        div = s
    else:
        div = source_scales(s, source.weight.shape[0], head_dim)  # checked before anything changes
        w = source.weight
        w.copy_((w.double() / div[:, None]).to(w.dtype))  # output rows [out, in] / s[out, 1]
    bias = getattr(source, "bias", None)
    if bias is not None:
        bias.copy_((bias.double() / div).to(bias.dtype))
    for linear in linears:
        w = linear.weight
        w.copy_((w.double() * s[None, :]).to(w.dtype))  # input columns [out, in] * s[1, in]
