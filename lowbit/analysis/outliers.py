"""LLM.int8() outlier features and massive activations: pure functions over collected activations."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .activations import r4
from .config import FeatureConfig, MassiveConfig


def _ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def outlier_features(hidden_inputs: list[dict[str, torch.Tensor]], config: FeatureConfig) -> dict:
    """Dimensions that reach |x| >= magnitude at >= min_positions of the positions in >= min_layers of layers.

    hidden_inputs: per layer, {linear name: [tokens, hidden]} of the linears that read the
    normalized hidden state. A position counts for a layer when any of its inputs reaches the
    magnitude there.
    """
    n_layers = len(hidden_inputs)
    need_layers = math.ceil(config.min_layers * n_layers - 1e-9)
    fractions, peaks = [], []                   # per layer: [hidden] share of positions, [hidden] max |x|
    for per_layer in hidden_inputs:
        xs = list(per_layer.values())
        hit = torch.stack([x.abs() >= config.magnitude for x in xs]).any(0)       # [tokens, hidden]
        fractions.append(hit.float().mean(0))
        peaks.append(torch.stack([x.abs().amax(0) for x in xs]).amax(0))
    frac = torch.stack(fractions)                                                  # [layers, hidden]
    peak = torch.stack(peaks)
    carries = frac >= config.min_positions
    dims = torch.nonzero(carries.sum(0) >= need_layers).flatten().tolist()
    features = []
    for d in sorted(dims, key=lambda d: -int(carries[:, d].sum())):
        layers = torch.nonzero(carries[:, d]).flatten().tolist()
        features.append({
            "dim": int(d), "layers": [int(l) for l in layers], "layer_ranges": _ranges(layers),
            "share_of_layers": r4(len(layers) / n_layers),
            "positions_share": {str(l): r4(frac[l, d]) for l in layers},
            "mean_positions_share": r4(frac[layers, d].mean()),
            "max_abs": r4(peak[:, d].max()), "max_abs_layer": int(peak[:, d].argmax()),
        })
    any_hit = (frac > 0)
    return {
        "definition": config.definition, "thresholds": {"magnitude": config.magnitude,
                                                        "min_layers": config.min_layers,
                                                        "min_positions": config.min_positions},
        "layers_needed": int(need_layers), "features": features,
        "per_layer": [{"layer": int(l), "dims_reaching_magnitude": int(any_hit[l].sum()),
                       "max_abs": r4(peak[l].max()), "max_abs_dim": int(peak[l].argmax())} for l in range(n_layers)],
        "feature_profiles": {str(f["dim"]): [r4(v) for v in peak[:, f["dim"]].tolist()] for f in features},
        "max_abs_profile": [r4(v) for v in peak.amax(1).tolist()],
    }


def massive_mask(h: torch.Tensor, config: MassiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, L, d] bool mask of massive values, [N, L, d] ratio to the median |h| of each sample's hidden state)."""
    a = h.abs()
    medians = a.flatten(1).median(1).values.clamp_min(1e-30)                       # [N] per sample
    ratio = a / medians[:, None, None]
    return (a > config.min_value) & (ratio >= config.min_ratio), ratio


def massive_activations(residual: list[torch.Tensor], texts: list[list[str]], config: MassiveConfig,
                        top: int = 3, keep_occurrences: int = 12) -> dict:
    """Residual-stream values > min_value and >= min_ratio x the median |h| of their hidden state.

    residual: per layer, the layer's output [N, L, hidden]; texts[n][t] is the token at position t.
    """
    hits = defaultdict(list)                     # dim -> [(layer, sample, position, value, ratio)]
    per_layer = []
    for layer, h in enumerate(residual):
        mask, ratio = massive_mask(h, config)
        a = h.abs()
        medians = a.flatten(1).median(1).values.clamp_min(1e-30)
        for n, t, d in torch.nonzero(mask).tolist():
            hits[d].append((layer, n, t, float(h[n, t, d]), float(ratio[n, t, d])))
        flat = a.flatten()
        vals, idx = flat.topk(min(top, flat.numel()))
        per_layer.append({
            "layer": int(layer), "median_abs": r4(medians.median()),
            "top": [{"value": r4(v), "dim": int(i % h.shape[-1]), "position": int((i // h.shape[-1]) % h.shape[1])}
                    for v, i in zip(vals.tolist(), idx.tolist())],
        })
    dims = []
    for d, occ in sorted(hits.items(), key=lambda kv: -max(abs(o[3]) for o in kv[1])):
        layers = sorted({o[0] for o in occ})
        positions = sorted({o[2] for o in occ})
        tokens = sorted({(o[2], texts[o[1]][o[2]]) for o in occ})
        best = max(occ, key=lambda o: abs(o[3]))
        dims.append({
            "dim": int(d), "layers": [int(l) for l in layers], "layer_ranges": _ranges(layers),
            "first_layer": int(layers[0]), "last_layer": int(layers[-1]),
            "positions": [int(p) for p in positions],
            "tokens": [{"position": int(p), "text": s} for p, s in tokens][:keep_occurrences],
            "max_value": r4(best[3]), "max_at": {"layer": int(best[0]), "sample": int(best[1]),
                                                 "position": int(best[2]), "ratio_to_median": r4(best[4])},
            "occurrences": len(occ),
            "examples": [{"layer": int(l), "sample": int(n), "position": int(t), "value": r4(v), "ratio_to_median": r4(r)}
                         for l, n, t, v, r in sorted(occ, key=lambda o: -abs(o[3]))[:keep_occurrences]],
        })
    profiles = {str(d["dim"]): [r4(h[..., d["dim"]].abs().max()) for h in residual] for d in dims[:8]}
    return {"definition": config.definition,
            "thresholds": {"min_value": config.min_value, "min_ratio": config.min_ratio},
            "dims": dims, "per_layer": per_layer, "dim_profiles": profiles}
