"""Dense-and-sparse weights (the seeds' "split" answer for weights; SpQR, SqueezeLLM): the few weights
whose rounding costs most stay in float16 as a sparse matrix beside the low-bit dense part.

Which ones: the largest OBS saliency of plain rounding, (w_ij − RTN(w_ij))² / [H⁻¹]_jj — the output
error GPTQ's own update would have to absorb for that weight alone. They are chosen before GPTQ, so
GPTQ keeps them exact (their error is 0) and compensates around them; the dense group scales are
computed without them, so their range no longer stretches the grid of their group.
Storage: a 32-bit flat index and a 16-bit value per kept weight; or (layout "columns", OWQ's
outlier-aware mixed precision inside a tensor) whole input columns of largest summed saliency, a
32-bit index per column and its float16 values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats import Format
from lowbit.formats.sparse import SparseOutliers  # noqa: F401  (re-exported)

LAYOUTS = ("entries", "columns")


def obs_saliency(W: Tensor, H: Tensor, fmt: Format, damp: float = 0.01) -> Tensor:
    """(w − RTN(w))² / [(H + λI)⁻¹]_jj per weight [out, in]; λ = damp · mean diag H (as GPTQ damps)."""
    H64 = H.double().clone()
    H64.diagonal()[H64.diagonal() == 0] = 1.0                              # dead inputs: as GPTQ treats them
    H64.diagonal().add_(damp * float(H64.diagonal().mean()))
    inv_diag = torch.linalg.inv(H64).diagonal().float()                    # [in]
    E = W.float() - fmt.dequantize(fmt.quantize(W.float()))
    return E.pow(2) / inv_diag[None, :]


def choose_outliers(W: Tensor, H: Tensor, fmt: Format, share: float, damp: float = 0.01,
                    layout: str = "entries") -> Tensor:
    """Bool mask [out, in] of the round(share · W.numel()) weights of largest OBS saliency, or (columns,
    OWQ) of the round(share · in) input columns of largest summed saliency."""
    if not 0.0 <= share < 0.5:
        raise ValueError(f"outlier share must be in [0, 0.5), got {share!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown outlier layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if layout == "columns":
        c = round(share * W.shape[1])
        mask = torch.zeros(W.shape[1], dtype=torch.bool)
        if c:
            mask[torch.topk(obs_saliency(W, H, fmt, damp).sum(0), c).indices] = True
        return mask[None, :].expand(W.shape).clone()
    k = round(share * W.numel())
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(obs_saliency(W, H, fmt, damp).reshape(-1), k).indices] = True
    return mask.reshape(W.shape)


def kept_rtn(W: Tensor, fmt: Format, H: Tensor, share: float) -> Tensor:
    """W [out, in] rounded to nearest with the `share` of largest OBS saliency (choose_outliers, on the
    input Hessian H [in, in]) kept in float16; the dense grid is set without them, as GPTQ sets it (the
    planner's loss of a dense-and-sparse option)."""
    W = W.float()
    mask = choose_outliers(W, H, fmt, share)                               # [out, in]
    return torch.where(mask, W.half().float(), fmt.fake_quantize(W.masked_fill(mask, 0.0)))
