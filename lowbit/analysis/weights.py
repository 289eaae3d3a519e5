"""Weight statistics per linear: outlier-ness, spread of channel ranges, and RTN error per format.

Pure functions over weight tensors: no hooks, no I/O.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..formats import make_format
from .activations import r4
from .config import WeightConfig


def format_name(bits: int, group: int) -> str:
    return make_format("int", bits=bits, group_size=group).name


def linear_stats(W: torch.Tensor, config: WeightConfig) -> dict:
    """absmax / std, kurtosis, row and column range spread, and ||W - RTN(W)|| / ||W|| per format."""
    W = W.detach().float()
    std = float(W.std().clamp_min(1e-30))
    centred = W - W.mean()
    kurt = float((centred.pow(4).mean() / centred.pow(2).mean().pow(2).clamp_min(1e-30)))
    flat = int(W.abs().argmax())
    row_max, col_max = W.abs().amax(1), W.abs().amax(0)
    errors = {}
    norm = float(W.norm().clamp_min(1e-30))
    for bits, group in config.formats:
        fmt = make_format("int", bits=bits, group_size=group)
        errors[fmt.name] = r4(float((fmt.fake_quantize(W) - W).norm()) / norm)
    return {
        "shape": [int(s) for s in W.shape], "absmax": r4(W.abs().max()), "std": r4(std),
        "absmax_over_std": r4(W.abs().max() / std), "kurtosis": r4(kurt),
        "absmax_at": {"row": flat // W.shape[1], "col": flat % W.shape[1]},
        "row_range_spread": r4(row_max.max() / row_max.median().clamp_min(1e-30)),
        "col_range_spread": r4(col_max.max() / col_max.median().clamp_min(1e-30)),
        "rtn_rel_error": errors,
    }


@torch.no_grad()
def weight_section(model, spec, config: WeightConfig, progress: bool = True) -> dict:
    layers = model.get_submodule(spec.layers)
    rows = []
    for i, layer in enumerate(tqdm(layers, desc="weights", unit="layer", disable=not progress)):
        for name in spec.linears:
            rows.append({"layer": int(i), "linear": name, **linear_stats(layer.get_submodule(name).weight, config)})
    top = sorted(rows, key=lambda r: -r["absmax_over_std"])[:10]
    return {"definition": ("Per linear weight W [out, in]: absmax / std and kurtosis (3 for a Gaussian) say how "
                           "heavy the tails are; row (column) range spread = the largest row (column) absmax over "
                           "the median one; RTN error = ||W - Q(W)|| / ||W|| with symmetric absmax scales."),
            "formats": [format_name(b, g) for b, g in config.formats], "linears": rows,
            "most_outlying": [{"layer": r["layer"], "linear": r["linear"], "absmax_over_std": r["absmax_over_std"],
                               "absmax_at": r["absmax_at"]} for r in top]}
