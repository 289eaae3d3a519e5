"""Super weights: the down-projection weights that create massive activations; removed, searched again, verified.

`find_super_weights` is the pure detector; `search` runs its rounds (zero, re-run, look again)
and `verify` measures each found weight against a random control with a Probe.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .activations import r4
from .collect import DownStats, collect_down
from .config import MassiveConfig, SuperWeightConfig
from .outliers import massive_mask
from .probe import Probe, down_module, zeroed


@dataclass(frozen=True)
class Candidate:
    layer: int
    row: int                   # output channel j (a hidden dimension)
    col: int                   # input channel k (an intermediate dimension)
    sample: int
    position: int
    token: str
    x: float                   # the input spike x_k at that token
    weight: float              # W[j, k]
    y: float                   # the down projection's output y_j at that token
    share: float               # x_k * W[j, k] / y_j
    residual: float            # the massive value h_j after this layer
    weight_over_std: float     # |W[j, k]| / std(W) of the layer
    tokens: int                # tokens (over all samples) where this weight creates the massive value
    round: int

    def to_dict(self) -> dict:
        return {k: (r4(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def profile(down: list[DownStats]) -> tuple[list[float], list[float]]:
    """Per layer: the largest |input| and |output| of the down projection over all tokens."""
    return ([float(d.in_val.abs().max()) for d in down], [float(d.out.abs().max()) for d in down])


def find_super_weights(down: list[DownStats], residual: list[torch.Tensor], embedded: torch.Tensor,
                       weights: list[torch.Tensor], texts: list[list[str]], massive: MassiveConfig,
                       config: SuperWeightConfig, round_: int = 1) -> tuple[list[Candidate], list[dict]]:
    """Candidates (accepted) and rejected massive-activation creations (with the reason) of one round.

    down[l]: per-token input spike and outputs of layer l's down projection; residual[l]: layer
    l's output [N, L, d]; embedded: layer 0's input; weights[l]: layer l's down weight
    [hidden, intermediate] as it is now (earlier rounds' finds already zeroed).
    """
    found, rejected = {}, {}
    for layer, (ds, h, W) in enumerate(zip(down, residual, weights)):
        before = residual[layer - 1] if layer else embedded
        mask, _ = massive_mask(h, massive)
        grown = (h - before).abs() >= config.min_growth * h.abs()
        seq_len = h.shape[1]
        std = float(W.float().std().clamp_min(1e-30))
        for n, t, j in torch.nonzero(mask & grown).tolist():
            i = n * seq_len + t
            if int(ds.out[i].abs().argmax()) != j:          # the down projection's output does not spike at j
                continue
            k, x = int(ds.in_arg[i]), float(ds.in_val[i])
            w, y = float(W[j, k]), float(ds.out[i, j])
            share = x * w / y if y != 0 else 0.0
            c = Candidate(layer, j, k, n, t, texts[n][t], x, w, y, share, float(h[n, t, j]), abs(w) / std, 1, round_)
            target = found if share >= config.min_share else rejected
            key = (layer, j, k)
            if key in target:
                old = target[key]
                best = c if abs(c.residual) > abs(old.residual) else old
                c = Candidate(**{**asdict(best), "tokens": old.tokens + 1})
            target[key] = c
    order = lambda c: -abs(c.residual)
    reason = f"x_k * W[j, k] explains less than {config.min_share:.0%} of y_j: no single weight"
    return (sorted(found.values(), key=order)[: config.max_per_round],
            [{**c.to_dict(), "reason": reason} for c in sorted(rejected.values(), key=order)[:20]])


def search(model, spec, rows: torch.Tensor, texts: list[list[str]], first: tuple,
           massive: MassiveConfig, config: SuperWeightConfig, progress: bool = True) -> tuple[list[Candidate], list[dict]]:
    """The seeds' iterative procedure; the model's weights are restored on return."""
    n_layers = len(first[0])
    found, rounds, (down, residual, embedded) = [], [], first
    with ExitStack() as stack:
        for r in range(1, config.rounds + 1):
            weights = [down_module(model, spec, l).weight.detach() for l in range(n_layers)]
            new, rejected = find_super_weights(down, residual, embedded, weights, texts, massive, config, r)
            a, b = profile(down)
            rounds.append({"round": r, "max_abs_input": [r4(v) for v in a], "max_abs_output": [r4(v) for v in b],
                           "max_abs_residual": [r4(h.abs().max()) for h in residual],
                           "found": [c.to_dict() for c in new], "rejected": rejected})
            if not new:
                break
            found += new
            stack.enter_context(zeroed(model, spec, [(c.layer, c.row, c.col) for c in new]))
            if r < config.rounds:
                down, residual, embedded = collect_down(model, spec, rows, progress, desc=f"super weights round {r + 1}")
    return found, rounds


def _random_coords(model, spec, layers: list[int], avoid: set, gen: torch.Generator) -> list[tuple[int, int, int]]:
    coords = []
    for layer in layers:
        rows, cols = down_module(model, spec, layer).weight.shape
        while True:
            c = (layer, int(torch.randint(rows, (1,), generator=gen)), int(torch.randint(cols, (1,), generator=gen)))
            if c not in avoid and c not in coords:
                coords.append(c)
                break
    return coords


def verify(model, spec, probe: Probe, found: list[Candidate], config: SuperWeightConfig, seed: int = 0,
           progress: bool = True) -> dict:
    """Zero each found weight alone, then all together; beside each, as many random weights of the same layers."""
    gen = torch.Generator().manual_seed(seed)
    avoid = {(c.layer, c.row, c.col) for c in found}
    jobs = [([c], f"{c.layer}:{c.row},{c.col}") for c in found]
    if len(found) > 1:
        jobs.append((found, "all"))
    results = []
    bar = tqdm(total=2 * len(jobs), desc="super weights check", unit="eval", disable=not progress, leave=False)
    for cands, label in jobs:
        coords = [(c.layer, c.row, c.col) for c in cands]
        start = min(c.layer for c in cands)
        with zeroed(model, spec, coords):
            zero = probe.score(start)
        bar.update()
        control_coords = _random_coords(model, spec, [c.layer for c in cands], avoid, gen)
        with zeroed(model, spec, control_coords):
            control = probe.score(start)
        bar.update()
        confirmed = zero["kld"] >= config.min_kld and zero["kld"] >= config.confirm_ratio * control["kld"]
        results.append({"weights": label, "coords": [list(c) for c in coords], "zeroed": zero,
                        "control": {**control, "coords": [list(c) for c in control_coords]},
                        "confirmed": bool(confirmed)})
    bar.close()
    return {"float_ppl": r4(probe.ppl), "predictions": probe.predictions, "checks": results}
