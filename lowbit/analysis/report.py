"""`analyze`: collect once, run every detector, verify, and assemble report.json's plain-typed dict."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import __version__
from ..errors import LowbitError
from ..log import logger
from .activations import activation_section, r4
from .int8_error import int8_section
from .collect import check_spec, collect, make_rows
from .config import AnalyzeConfig
from .outliers import massive_activations, outlier_features
from .probe import Probe
from .sensitivity import sensitivity_section
from .superweights import search, verify
from .weights import weight_section


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file, not a directory")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(report: dict) -> list[str]:
    """Plain sentences for the top of the page: what was found, and what it costs."""
    lines = []
    sw = report["super_weights"]
    v = sw["verification"]
    checks = {c["weights"]: c for c in v["checks"]}
    found = sw["found"]
    if found:
        confirmed = [c for c in found if checks[f"{c['layer']}:{c['row']},{c['col']}"]["confirmed"]]
        parts = []
        for c in confirmed:
            chk = checks[f"{c['layer']}:{c['row']},{c['col']}"]
            parts.append(f"layer {c['layer']} row {c['row']} column {c['col']} (W = {c['weight']:g}; zeroed: ppl "
                         f"{chk['zeroed']['ppl']:g}, KLD {chk['zeroed']['kld']:.3g}; random control: ppl "
                         f"{chk['control']['ppl']:g}, KLD {chk['control']['kld']:.2g})")
        line = (f"{_plural(len(confirmed), 'confirmed super weight')} of {_plural(len(found), 'candidate')} "
                f"(float ppl {v['float_ppl']:g})" + (": " + "; ".join(parts) if parts else ""))
        if "all" in checks:
            a = checks["all"]
            line += (f". All {len(found)} zeroed together: ppl {a['zeroed']['ppl']:g} (KLD {a['zeroed']['kld']:.3g}) "
                     f"vs {a['control']['ppl']:g} for as many random weights")
        lines.append(line + ".")
    else:
        lines.append("No super weight: no down-projection weight creates a massive activation.")
    dims = report["massive_activations"]["dims"]
    if dims:
        parts = []
        for d in dims[:4]:
            where = ", ".join(f"{t['position']} {t['text']!r}" for t in d["tokens"][:3])
            more = ", …" if len(d["positions"]) > 3 else ""
            parts.append(f"dim {d['dim']} in layers {d['layer_ranges']} at {_plural(len(d['positions']), 'position')} "
                         f"({where}{more}), up to {d['max_value']:g}")
        lines.append(f"{_plural(len(dims), 'massive-activation dimension')}: " + "; ".join(parts) + ".")
    else:
        lines.append("No massive activation in the residual stream.")
    feats = report["outlier_features"]["features"]
    if feats:
        parts = [f"dim {f['dim']} (layers {f['layer_ranges']})" for f in feats[:6]]
        more = f" and {len(feats) - 6} more" if len(feats) > 6 else ""
        lines.append(f"{_plural(len(feats), 'LLM.int8() outlier feature')}: " + ", ".join(parts) + more + ".")
    else:
        lines.append("No LLM.int8() outlier feature at the default thresholds.")
    for key, w in list(report["activations"]["lowest_median_levels"].items())[:2]:
        bits, scaling = key.split("_", 1)
        lines.append(f"Effective levels at {bits} {scaling.replace('_', '-')}: the median channel of the input of "
                     f"layer {w['layer']} {w['input_of']} uses only {w['levels']:g} of {2 ** int(bits[3:])} levels.")
    sens = report["sensitivity"]
    if sens["ranking"]:
        top = ", ".join(f"layer {r['layer']}" + (f" {r['linear']}" if r["linear"] != "all" else "") +
                        f" ({r['kld']:.3g})" for r in sens["ranking"][:3])
        lines.append(f"Most sensitive at {sens['rank_by']} (KLD when only it is quantized): {top}.")
    return lines


@torch.no_grad()
def analyze(loaded, text, config: AnalyzeConfig, model_arg: str = "", progress: bool = True) -> dict:
    """The whole diagnosis of a float model on `text` (a lowbit.data.text.Text) as plain types."""
    model, spec, tok = loaded.model, loaded.spec, loaded.tokenizer
    check_spec(model, spec)
    times, t0 = {}, time.perf_counter()
    rows = make_rows(tok, text, config.samples, config.seq_len, config.seed)
    c = collect(model, spec, tok, rows, progress)
    times["collect"] = time.perf_counter() - t0
    reads = {g.linears[0]: g.linears for g in spec.groups}
    hidden_names = [g.linears[0] for g in spec.groups if g.source_kind == "norm"]
    t = time.perf_counter()
    activations = activation_section(c.inputs, c.levels, reads, hidden_names, config.levels)
    int8 = int8_section(c.inputs, model.get_submodule(spec.layers), reads)
    features = outlier_features(c.hidden_inputs, config.features)
    massive = massive_activations(c.residual, c.texts, config.massive)
    times["detect"] = time.perf_counter() - t
    t = time.perf_counter()
    found, rounds = search(model, spec, rows, c.texts, (c.down, c.residual, c.embedded), config.massive, config.super_weights,
                           progress)
    del c
    probe = Probe(model, spec, rows[: config.eval_samples, : config.eval_tokens])
    checks = verify(model, spec, probe, found, config.super_weights, config.seed, progress)
    times["super_weights"] = time.perf_counter() - t
    t = time.perf_counter()
    weights = weight_section(model, spec, config.weights, progress)
    times["weights"] = time.perf_counter() - t
    t = time.perf_counter()
    sensitivity = sensitivity_section(model, spec, probe, config.sensitivity, progress)
    times["sensitivity"] = time.perf_counter() - t
    bos = getattr(tok, "bos_token_id", None)
    report = {
        "lowbit_version": __version__,
        "model": {"arg": model_arg, "source": loaded.source.name, "family": spec.family,
                  "sha256": loaded.sha256, "layers": len(model.get_submodule(spec.layers)),
                  "hidden": int(model.config.hidden_size), "intermediate": int(model.config.intermediate_size),
                  "down_projection": spec.down},
        "text": {"origin": text.origin, "sha256": text.sha256, "samples": int(rows.shape[0]),
                 "seq_len": int(rows.shape[1]), "tokens": int(rows.numel()), "seed": config.seed,
                 "bos": None if bos is None else {"id": int(bos), "text": tok.decode([bos])},
                 "probe": {"samples": int(probe.rows.shape[0]), "tokens": int(probe.rows.shape[1]),
                           "predictions": probe.predictions, "float_ppl": r4(probe.ppl)}},
        "config": config.to_dict(),
        "activations": activations, "int8_inputs": int8, "outlier_features": features, "massive_activations": massive,
        "super_weights": {"definition": config.super_weights.definition, "found": [f.to_dict() for f in found],
                          "rounds": rounds, "verification": checks},
        "weights": weights, "sensitivity": sensitivity,
    }
    report["summary"] = summary(report)
    report["seconds"] = {k: round(v, 2) for k, v in times.items()}
    return report


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    from .html import render

    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False))
    html_path.write_text(render(report), encoding="utf-8")
    logger.info("wrote %s and %s", json_path, html_path)
    return json_path, html_path
