"""Activation statistics of every linear's input, and the effective quantization levels per channel.

Pure functions over collected statistics: no hooks, no I/O.
"""
from __future__ import annotations

import torch

from ..calibration.stats import InputStats
from .config import LevelsConfig


def r4(x: float) -> float:
    """A float rounded to 4 significant digits (keeps report.json small and readable)."""
    return float(f"{float(x):.4g}")


def effective_levels(absmax: torch.Tensor, token_share_sum: torch.Tensor, tokens: int, bits: int) -> dict:
    """Levels each channel uses at `bits` under per-tensor and per-token absmax scaling, [in] each.

    per tensor: 2^b * m_i / m with m_i the channel's absmax and m the tensor's (seed 001 §1.7);
    per token:  2^b * mean_t |x_ti| / max_j |x_tj| (each token its own scale group).
    """
    top = float(absmax.max().clamp_min(1e-30))
    return {"per_tensor": (2 ** bits) * absmax.float() / top,
            "per_token": (2 ** bits) * token_share_sum.float() / max(tokens, 1)}


def _summary(levels: torch.Tensor) -> dict:
    q = torch.quantile(levels.float(), torch.tensor([0.1, 0.5]))
    return {"min": r4(levels.min()), "p10": r4(q[0]), "median": r4(q[1]),
            "share_below_4": r4((levels < 4).float().mean())}


def input_stats(layer: int, name: str, reads: tuple[str, ...], stats: InputStats, share_sum: torch.Tensor,
                config: LevelsConfig, top: int = 5) -> dict:
    """One linear input: per-channel absmax, mean |x|, kurtosis, and the effective levels summary."""
    absmax, mean_abs, kurt = stats.absmax, stats.mean_abs, stats.kurtosis
    median = float(absmax.median().clamp_min(1e-30))
    order = absmax.argsort(descending=True)[:top]
    levels = {}
    for bits in config.bits:
        lv = effective_levels(absmax, share_sum, stats.tokens, bits)
        levels[str(bits)] = {scaling: _summary(v) for scaling, v in lv.items()}
    return {
        "layer": int(layer), "input_of": list(reads), "channels": int(absmax.numel()), "tokens": int(stats.tokens),
        "absmax": r4(absmax.max()), "absmax_channel": int(absmax.argmax()), "median_absmax": r4(median),
        "absmax_over_median": r4(absmax.max() / median),
        "mean_abs": r4(mean_abs.mean()),
        "kurtosis_max": r4(kurt.max()), "kurtosis_max_channel": int(kurt.argmax()),
        "kurtosis_median": r4(kurt.median()),
        "top_channels": [{"channel": int(c), "absmax": r4(absmax[c]), "mean_abs": r4(mean_abs[c]),
                          "kurtosis": r4(kurt[c])} for c in order],
        "levels": levels,
        "per_channel": {"absmax": [r4(v) for v in absmax.tolist()], "mean_abs": [r4(v) for v in mean_abs.tolist()],
                        "kurtosis": [r4(v) for v in kurt.tolist()]},
    }


def activation_section(inputs: list[dict[str, InputStats]], shares: list[dict[str, torch.Tensor]],
                       reads: dict[str, tuple[str, ...]], hidden_names: list[str], config: LevelsConfig) -> dict:
    """All linear inputs of all layers; `hidden_inputs` names those of hidden size (the heat maps)."""
    rows = [input_stats(i, name, reads[name], s, shares[i][name], config)
            for i, per_layer in enumerate(inputs) for name, s in per_layer.items()]
    worst = {}
    for bits in config.bits:
        for scaling in ("per_tensor", "per_token"):
            w = min(rows, key=lambda r: r["levels"][str(bits)][scaling]["median"])
            worst[f"int{bits}_{scaling}"] = {"levels": w["levels"][str(bits)][scaling]["median"], "layer": w["layer"],
                                             "input_of": "/".join(p.split(".")[-1] for p in w["input_of"])}
    return {"definition_levels": config.definition, "inputs": rows, "hidden_inputs": list(hidden_names),
            "lowest_median_levels": worst}
