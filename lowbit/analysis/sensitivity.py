"""Layer sensitivity: KLD against the float model when only one layer (or one linear) is RTN-quantized."""
from __future__ import annotations

from tqdm.auto import tqdm

from ..formats import make_format
from .activations import r4
from .config import SensitivityConfig
from .probe import Probe, fake_quantized


def sensitivity_section(model, spec, probe: Probe, config: SensitivityConfig, progress: bool = True) -> dict:
    """One row per layer (or linear) with ppl / KLD at each bit width; ranked by KLD at the fewest bits."""
    if config.mode == "none":
        return {"mode": "none", "rows": [], "ranking": []}
    layers = model.get_submodule(spec.layers)
    fmts = {b: make_format("int", bits=b, group_size=config.group_size) for b in config.bits}
    units = [(i, None) for i in range(len(layers))] if config.mode == "layer" else \
        [(i, name) for i in range(len(layers)) for name in spec.linears]
    rows = []
    bar = tqdm(total=len(units) * len(fmts), desc=f"sensitivity ({config.mode})", unit="eval", disable=not progress)
    for layer, name in units:
        modules = [layers[layer].get_submodule(n) for n in ([name] if name else spec.linears)]
        row = {"layer": int(layer), "linear": name or "all"}
        for bits, fmt in fmts.items():
            with fake_quantized(modules, fmt):
                row[fmt.name] = probe.score(layer)
            bar.update()
        rows.append(row)
    bar.close()
    key = fmts[min(fmts)].name
    ranking = sorted(rows, key=lambda r: -r[key]["kld"])
    return {"mode": config.mode, "formats": [f.name for f in fmts.values()], "rank_by": key,
            "float_ppl": r4(probe.ppl), "predictions": probe.predictions,
            "definition": ("KL(P_float || P_quantized) in nats, averaged over the probe's next-token predictions, "
                           f"when only that {config.mode} is round-to-nearest quantized ({', '.join(f.name for f in fmts.values())}) "
                           "and everything else stays float."),
            "rows": rows, "ranking": [{"layer": r["layer"], "linear": r["linear"], "kld": r[key]["kld"]} for r in ranking]}
