"""The "why" beside the "what" for activations: the int8 error each linear's input would take, under
per-tensor and per-token scaling, before and after SmoothQuant's α = 0.5 smoothing.

error = ‖x̂ − x‖² / ‖x‖² over the kept calibration rows, where x̂ is the input as the quantized
linear would see it, mapped back to x's coordinates: per tensor, one scale from the calibration
absmax (what a static per-tensor format takes); per token, each row's absmax; smoothed, x / s is
quantized and multiplied back by s, with s = max|X_j|^0.5 / max|W_j|^0.5 over the linears reading x.
Pure functions over collected statistics.
"""
from __future__ import annotations

import torch

from ..formats.activation import act_format_from_name, fake_quantize_act, static_scale
from ..methods.smoothquant import smoothquant_scales, weight_absmax

PER_TENSOR = act_format_from_name("a8-static-sym")
PER_TOKEN = act_format_from_name("a8-token-sym")


def _rel(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x_hat - x).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


def int8_errors(rows: torch.Tensor, x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> dict:
    """{per_tensor, per_token, per_tensor_smoothed, per_token_smoothed, alpha} for rows [T, in] of one input."""
    rows = rows.float()
    s = smoothquant_scales(x_absmax, weight_absmax(weights), alpha)
    out = {"alpha": alpha}
    for suffix, scale in (("", torch.ones_like(s)), ("_smoothed", s)):
        xs = rows / scale
        tensor_scale = static_scale(PER_TENSOR, absmax=float((x_absmax / scale).max()))
        out["per_tensor" + suffix] = _rel(rows, fake_quantize_act(xs, PER_TENSOR, tensor_scale) * scale)
        out["per_token" + suffix] = _rel(rows, fake_quantize_act(xs, PER_TOKEN) * scale)
    return out


def int8_section(inputs: list[dict], layers, reads: dict[str, tuple[str, ...]]) -> dict:
    """Every linear input of every layer: int8_errors, and the inputs smoothing helps most."""
    rows = []
    for i, per_layer in enumerate(inputs):
        for name, st in per_layer.items():
            if "rows" not in st.wanted or not st.kept_rows:
                continue
            weights = [layers[i].get_submodule(n).weight for n in reads[name]]
            e = int8_errors(st.rows, st.absmax, weights)
            rows.append({"layer": i, "input_of": list(reads[name]), **{k: float(f"{v:.4g}") for k, v in e.items()}})
    return {"definition": __doc__.split("\n\n")[1].replace("\n", " "), "inputs": rows}
