"""bench/plan.py's loss stages: the predicted or measured loss of every (tensor, candidate option), each stage
computed once and cached under the work dir (losses.json, losses-outliers.json, losses-gptq.json,
losses-fisher.json), and the rank correlation that judges a proxy against the measured KLD."""
from __future__ import annotations

import json
import time
from pathlib import Path

from common import CALIB_TEXT

# the candidates of the plan-<B>+gptq-losses+wide rows: the defaults and two more sizes between theirs
WIDE_FORMATS = ("int3-g128-sym-signed", "int5-g64-sym-signed")
# the candidates of the plan-<B>+fisher+fine rows: the defaults, WIDE_FORMATS and the formats whose uniform rows
# sit at the targets (finer groups)
FINE_FORMATS = ("int2-g32-sym-signed", "int2-g16-sym-signed", "int3-g32-sym-signed")
# the candidates added by the plan-<B>+fisher+more rows (--more): the steps left above 4 bits (4.5, 5.125, 6.125 bpw)
MORE_FORMATS = ("int4-g32-sym-signed", "int5-g128-sym-signed", "int6-g128-sym-signed")
# which Fisher loss a cached losses-fisher.json holds: H_g weights each token's inputs by its output gradient
# (analysis/fisher.py), and the GPTQ rounding is `lowbit quantize`'s own (act order, the sinks counted 100 times
# in its Hessians); files of another definition ("token-weighted": GPTQ without act order, until the act-order fix of 2026-12-07;
# none: the plain mean x xᵀ, before 2026-12-07) are redone
FISHER_DEFINITION = "token-weighted, quantize's GPTQ"
# the rounding a cached losses-gptq.json holds (none: GPTQ without act order or sinks, until the act-order fix of 2026-12-07)
GPTQ_ROUNDING = "quantize's GPTQ"
# the planner's dense-and-sparse options: beside the 2- and 3-bit candidates (where outliers pay for their bits)
OUTLIER_FORMATS = ("int2-g64-sym-signed", "int3-g64-sym-signed")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def probe_model(a, hessian_rows: bool = False):
    """(the loaded model, its probe rows [probe_samples, probe_seq_len] of WikiText-2 validation (seed 1),
    and with hessian_rows 16 × 512 other rows of it (seed 2) whose inputs give GPTQ its Hessians)."""
    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.models.load import load
    from lowbit.quantize import calibration_samples

    loaded = load(a.model)
    text = read_text(str(CALIB_TEXT))
    rows = calibration_samples(loaded, text, CalibConfig(a.probe_samples, a.probe_seq_len, 1))
    return loaded, rows, calibration_samples(loaded, text, CalibConfig(16, 512, 2)) if hessian_rows else None


def losses(a, work: Path) -> dict:
    """Both losses for every (tensor, format), computed once (work/losses.json)."""
    path = work / "losses.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from lowbit.analysis.probe import Probe
    from lowbit.analysis.tensor_losses import measured_losses, proxy_losses
    from lowbit.plans.planner import PlannerConfig, decoder_linears

    loaded, rows, _ = probe_model(a)
    names = decoder_linears(loaded.model, loaded.spec)
    fmts = PlannerConfig(3.0).candidates()
    start = time.perf_counter()
    with torch.no_grad():
        kld = measured_losses(loaded.model, loaded.spec, Probe(loaded.model, loaded.spec, rows), names, fmts)
    kld_s, start = time.perf_counter() - start, time.perf_counter()
    proxy = proxy_losses(loaded.model, rows, names, fmts)
    proxy_s = time.perf_counter() - start
    pairs = [(kld[n][f.name], proxy[n][f.name]) for n in names for f in fmts]
    out = {"names": names, "shapes": {n: list(loaded.model.get_submodule(n).weight.shape) for n in names},
           "formats": [f.name for f in fmts], "kld": kld, "proxy": proxy, "kld_seconds": kld_s, "proxy_seconds": proxy_s,
           "probe": {"text": str(CALIB_TEXT), "samples": a.probe_samples, "seq_len": a.probe_seq_len, "seed": 1},
           "spearman_all": spearman([k for k, _ in pairs], [p for _, p in pairs]),
           "spearman_by_format": {f.name: spearman([kld[n][f.name] for n in names], [proxy[n][f.name] for n in names])
                                  for f in fmts}}
    path.write_text(json.dumps(out, indent=1))
    return out


def outlier_losses(a, work: Path, found: dict) -> dict:
    """The measured KLD of every (tensor, format + outlier share) option as well, on the same probe rows
    (work/losses-outliers.json; the plain options are reused from `found`)."""
    path = work / "losses-outliers.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from lowbit.analysis.probe import Probe
    from lowbit.formats import format_from_name
    from lowbit.analysis.tensor_losses import measured_losses

    loaded, rows, _ = probe_model(a)
    start = time.perf_counter()
    with torch.no_grad():
        kld = measured_losses(loaded.model, loaded.spec, Probe(loaded.model, loaded.spec, rows), found["names"],
                              [format_from_name(f) for f in found["formats"]], tuple(a.outlier_shares),
                              known=found["kld"], beside=tuple(format_from_name(f).name for f in OUTLIER_FORMATS))
    out = {"shares": a.outlier_shares, "kld": kld, "kld_seconds": time.perf_counter() - start}
    path.write_text(json.dumps(out, indent=1))
    return out


def gptq_losses(a, work: Path, found: dict) -> dict:
    """The KLD of every (tensor, format) with the tensor rounded by GPTQ (`lowbit plan --loss kld-gptq`), for
    the default candidates and WIDE_FORMATS, on the same probe rows; GPTQ's Hessians from 16 × 512 other
    rows of validation (work/losses-gptq.json)."""
    path = work / "losses-gptq.json"
    if path.exists() and (cached := json.loads(path.read_text())).get("rounding") == GPTQ_ROUNDING:
        return cached
    import torch

    from lowbit.analysis.probe import Probe
    from lowbit.formats import format_from_name
    from lowbit.analysis.tensor_losses import measured_losses

    loaded, rows, h_rows = probe_model(a, hessian_rows=True)
    formats = [*found["formats"], *WIDE_FORMATS]
    start = time.perf_counter()
    with torch.no_grad():
        kld = measured_losses(loaded.model, loaded.spec, Probe(loaded.model, loaded.spec, rows), found["names"],
                              [format_from_name(f) for f in formats], rounding="gptq", hessian_rows=h_rows)
    out = {"rounding": GPTQ_ROUNDING, "formats": formats, "kld": kld, "kld_seconds": time.perf_counter() - start,
           "hessian_rows": {"samples": 16, "seq_len": 512, "seed": 2}}
    path.write_text(json.dumps(out, indent=1))
    return out


def fisher_stage(a, work: Path, found: dict) -> dict:
    """The Fisher-predicted KLD of every (tensor, format) GPTQ-rounded (`lowbit plan --loss fisher`), on the
    default candidates and WIDE_FORMATS; its gradient pass on --fisher-rows validation rows (seed 1; default
    4 × 2048, the CLI's default for both models), GPTQ's Hessians from 16 × 512 others (seed 2). With the
    measured RTN KLDs (the losses stage), the Fisher loss of the same roundings to nearest too, and its rank
    correlation with them — the pairs the proxy is ranked on (work/losses-fisher.json)."""
    path = work / "losses-fisher.json"
    formats = [*found["formats"], *WIDE_FORMATS, *(FINE_FORMATS if a.fine else ()), *(MORE_FORMATS if a.more else ())]
    shares = list(a.outlier_shares or ())
    earlier = json.loads(path.read_text()) if path.exists() else None
    if earlier and (earlier.get("definition") != FISHER_DEFINITION
                    or [earlier["rows"]["samples"], earlier["rows"]["seq_len"]] != list(a.fisher_rows)):
        earlier = None                                  # losses of an older definition or other rows: all made again
    had_shares = earlier.get("shares", []) if earlier else []
    if earlier and set(formats) <= set(earlier["formats"]) and set(shares) <= set(had_shares):
        return earlier
    from lowbit.analysis.fisher import fisher_losses
    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.formats import format_from_name
    from lowbit.quantize import calibration_samples

    loaded, _, h_rows = probe_model(a, hessian_rows=True)
    f_rows = calibration_samples(loaded, read_text(str(CALIB_TEXT)), CalibConfig(*a.fisher_rows, 1))
    # a cached file of fewer formats: only the missing ones (same rows and seeds, so the same g, H_g and Hessians)
    todo = [f for f in formats if not earlier or f not in earlier["formats"]]
    # dense-and-sparse options (the plan-<B>+fisher+outliers rows): OUTLIER_FORMATS with each share not yet held
    new_shares = tuple(s for s in shares if s not in had_shares)
    rounded_too = [f for f in OUTLIER_FORMATS if new_shares and f not in todo]
    start = time.perf_counter()
    loss = fisher_losses(loaded.model, loaded.spec, f_rows, found["names"],
                         [format_from_name(f) for f in (*todo, *rounded_too)], new_shares,
                         beside=OUTLIER_FORMATS if new_shares else None, hessian_rows=h_rows)
    seconds = time.perf_counter() - start
    if earlier:
        for n in found["names"]:
            loss[n] = {**loss[n], **earlier["kld"][n]}  # the same rows and seeds: held options are the same numbers
        # the time of both runs (each its own gradient pass)
        earlier.update(formats=[*earlier["formats"], *todo], shares=sorted({*had_shares, *new_shares}), kld=loss,
                       seconds=earlier["seconds"] + seconds, runs=earlier.get("runs", 1) + 1)
        path.write_text(json.dumps(earlier, indent=1))
        return earlier
    out = {"definition": FISHER_DEFINITION, "formats": formats, "shares": list(new_shares), "kld": loss,
           "seconds": seconds, "rows": {"samples": a.fisher_rows[0], "seq_len": a.fisher_rows[1], "seed": 1}}
    if "kld" in found:
        names, measured = found["names"], found["kld"]
        rtn = fisher_losses(loaded.model, loaded.spec, f_rows, names, [format_from_name(f) for f in found["formats"]],
                            rounding="rtn")
        pairs = [(measured[n][f], rtn[n][f]) for n in names for f in found["formats"]]
        out.update(rtn_kld=rtn, spearman_all=spearman([m for m, _ in pairs], [p for _, p in pairs]),
                   spearman_by_format={f: spearman([measured[n][f] for n in names], [rtn[n][f] for n in names])
                                       for f in found["formats"]})
    path.write_text(json.dumps(out, indent=1))
    return out


def tensors(a) -> dict:
    """The decoder linears, their shapes and the default candidates, without measuring anything."""
    from lowbit.models.load import load
    from lowbit.plans.planner import PlannerConfig, decoder_linears

    loaded = load(a.model)
    names = decoder_linears(loaded.model, loaded.spec)
    return {"names": names, "shapes": {n: list(loaded.model.get_submodule(n).weight.shape) for n in names},
            "formats": [f.name for f in PlannerConfig(3.0).candidates()]}
