"""Range versus resolution on real numbers: absmax grids with and without the outlier (seed 000 §1, 001 §1.6).

`grid_rows` is pure arithmetic on one vector; `pick_weight_row` and `pick_activation` choose a
real weight row and a real activation vector of a model (the most outlier-dominated ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.capture_tokens import capture_token_inputs


@dataclass(frozen=True)
class GridRow:
    bits: int
    outlier: str               # "in range" | "set aside"
    step: float                # distance between two grid levels
    levels_used: int           # distinct codes among the other values
    levels: int                # codes the grid has (2 * qmax + 1)
    zero_share: float          # share of the other values rounded to 0
    rel_error: float           # ||rest - Q(rest)|| / ||rest||


def absmax_grid(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Symmetric absmax quantization of v: (dequantized, integer codes, step); codes in [-qmax, qmax]."""
    qmax = 2 ** (bits - 1) - 1
    step = float(v.abs().max()) / qmax if float(v.abs().max()) > 0 else 1.0
    codes = torch.clamp(torch.round(v / step), -qmax, qmax)
    return codes * step, codes, step


def grid_rows(v: torch.Tensor, bits: tuple[int, ...] = (8, 4)) -> tuple[int, list[GridRow]]:
    """(index of the outlier = largest |v|, rows): the other values quantized with it in range or set aside."""
    v = v.detach().double().flatten()
    k = int(v.abs().argmax())
    rest = torch.ones_like(v, dtype=torch.bool)
    rest[k] = False
    out = []
    for b in bits:
        for label, source in (("in range", v), ("set aside", v[rest])):
            deq, codes, step = absmax_grid(source, b)
            if label == "in range":
                deq, codes = deq[rest], codes[rest]
            norm = float(v[rest].norm()) or 1.0
            out.append(GridRow(b, label, step, int(codes.unique().numel()), 2 ** b - 1,
                               float((codes == 0).double().mean()), float((deq - v[rest]).norm()) / norm))
    return k, out


@torch.no_grad()
def pick_weight_row(model, spec) -> tuple[int, int, torch.Tensor]:
    """(layer, row, W[row]) of the down projection row whose max |w| stands farthest above its median |w|."""
    best = (-1.0, 0, 0)
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        a = layer.get_submodule(spec.down).weight.detach().abs().float()
        ratio = a.amax(1) / a.median(1).values.clamp_min(1e-30)
        r = int(ratio.argmax())
        if float(ratio[r]) > best[0]:
            best = (float(ratio[r]), i, r)
    _, i, r = best
    return i, r, model.get_submodule(f"{spec.layers}.{i}.{spec.down}").weight.detach()[r].clone()


@torch.no_grad()
def pick_activation(model, spec, ids: torch.Tensor) -> tuple[int, str, int, torch.Tensor]:
    """(layer, linear, position, x) of the input vector (attention or MLP input) most dominated by one value.

    ids: [T] token ids run once through the model.
    """
    n_layers = len(model.get_submodule(spec.layers))
    reads = [g.linears[0] for g in spec.groups if g.source_kind == "norm"]
    names = [(i, n, f"{spec.layers}.{i}.{n}") for i in range(n_layers) for n in reads]
    with capture_token_inputs(model, [full for _, _, full in names], lambda x: x[0].clone()) as kept:
        model(input_ids=ids[None], use_cache=False, logits_to_keep=1)
    best = (-1.0, None)
    for i, n, full in names:
        x = kept[full][0].abs()                                   # [T, d]
        ratio = x.amax(1) / x.median(1).values.clamp_min(1e-30)
        t = int(ratio.argmax())
        if float(ratio[t]) > best[0]:
            best = (float(ratio[t]), (i, n, t, kept[full][0][t]))
    return best[1]


def plot(vectors: list[tuple[str, torch.Tensor]], bits: int, path) -> None:
    """PNG: each vector's values, the int`bits` grid with the outlier in range (red) and set aside (blue)."""
    from .plots import plt

    fig, axes = plt.subplots(len(vectors), 2, figsize=(11, 3.2 * len(vectors)), squeeze=False)
    for row, (title, v) in zip(axes, vectors):
        v = v.detach().double().flatten()
        k = int(v.abs().argmax())
        rest = torch.cat([v[:k], v[k + 1:]])
        _, _, step_in = absmax_grid(v, bits)
        _, _, step_out = absmax_grid(rest, bits)
        qmax = 2 ** (bits - 1) - 1
        for ax, zoom in zip(row, (False, True)):
            ax.scatter(range(v.numel()), v.numpy(), s=3, color="black", zorder=3)
            ax.scatter([k], [float(v[k])], s=30, color="#d62728", zorder=4, label="the outlier")
            for q in range(-qmax, qmax + 1):
                ax.axhline(q * step_in, color="#d62728", lw=0.8, alpha=0.7)
                if zoom:
                    ax.axhline(q * step_out, color="#1f77b4", lw=0.6, ls="--", alpha=0.7)
            if zoom:
                lim = float(rest.abs().max()) * 1.15
                ax.set_ylim(-lim, lim)
                ax.set_title(f"zoom on the rest: int{bits} levels with the outlier in range (red, {step_in:.3g} apart) "
                             f"vs set aside (blue, {step_out:.3g})", fontsize=8)
            else:
                ax.set_title(f"{title}\nint{bits} grid with the outlier in range", fontsize=8)
                ax.legend(fontsize=7)
            ax.set_xlabel("index")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
