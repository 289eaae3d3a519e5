"""The walker's activation side: SmoothQuant's scales searched and folded per layer, and each
linear's static activation scale computed from its (smoothed) calibration inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .methods.awq import scaled_hessian
from .methods.smoothquant import (act_scale_after, quantized_output_error, search_alpha, smoothquant_scales,
                                  weight_absmax)
from .transforms.scaling import fold_scales, tie_to_source


@dataclass
class SmoothRecord:
    """What smoothing chose, per layer and group source: α and err(α) (methods.smoothquant)."""

    alphas: dict = field(default_factory=dict)      # {layer: {source: α}}
    errors: dict = field(default_factory=dict)      # {layer: {source: {α: err}}}
    scales: dict = field(default_factory=dict)      # {layer: {source: s [in]}}


def smooth_layer(index: int, layer: torch.nn.Module, spec, head_dim: int | None, stats: dict, fmt_of: dict,
                 act_of: dict, cfg, H: dict, imp: dict, record: SmoothRecord) -> dict:
    """Search (or compute) each group's SmoothQuant scales, fold them in place, rescale the groups'
    Hessians and imatrices (the input is now x / s); returns {linear: s} of the smoothed linears."""
    s_of = {}
    for group in spec.groups:
        names = [n for n in group.linears if n in stats and fmt_of.get(n) is not None]
        if not names:
            continue
        st = stats[group.linears[0]]
        Ws = [layer.get_submodule(n).weight for n in group.linears]
        x_absmax, w_absmax = st.absmax, weight_absmax(Ws)
        if group.source_kind == "linear":     # o_proj's input under GQA: scales tied across repeats
            width = layer.get_submodule(group.source).weight.shape[0]
            x_absmax = tie_to_source(x_absmax, width, head_dim, reduce="max")
            w_absmax = tie_to_source(w_absmax, width, head_dim, reduce="max")
        w_fmts = [fmt_of.get(n) for n in group.linears]
        act = act_of.get(group.linears[0])
        rows = st.rows if "rows" in st.wanted else None
        if cfg.alpha is None:
            alpha, s, errors = search_alpha(rows, x_absmax, w_absmax, Ws, w_fmts, act, cfg.alphas)
        else:
            alpha, s = cfg.alpha, smoothquant_scales(x_absmax, w_absmax, cfg.alpha)
            errors = {} if rows is None else {alpha: quantized_output_error(rows, Ws, w_fmts, act, s, x_absmax)}
        fold_scales(layer, group, s, norm_offset=spec.norm_offset, head_dim=head_dim)
        H_group = None if H.get(group.linears[0]) is None else scaled_hessian(H[group.linears[0]], s)
        for name in group.linears:
            H[name] = H_group
            imp[name] = None if imp.get(name) is None else imp[name] / s.double().pow(2)
            s_of[name] = s
        record.alphas.setdefault(index, {})[group.source] = alpha
        record.errors.setdefault(index, {})[group.source] = errors
        record.scales.setdefault(index, {})[group.source] = s
    return s_of


def input_scales(stats: dict, act_of: dict, s_of: dict) -> dict:
    """{linear: calibrated input scale [1]} of the linears whose activation format is static, for
    their input x / s (s: the smoothing folded in, if any)."""
    out = {}
    for name, act in act_of.items():
        if act is None or not act.static or name not in stats:
            continue
        st = stats[name]
        s = s_of.get(name, torch.ones(st.in_features))
        out[name] = act_scale_after(act, st.absmax, st.rows if "rows" in st.wanted else None, s)
    return out
