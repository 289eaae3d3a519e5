"""bench/plan.py's plan-<B>+fisher+refine rows: the Fisher knapsack's plan refined by the measured search
(`lowbit plan --refine`): every (tensor, option) GPTQ-rounded once on the Hessians of quantize's walk of the
knapsack's plan (cached under the work dir), models assembled from them judged by their KLD against float on
--refine-rows validation rows (seed 3: apart from the gradient rows, seed 1, GPTQ's Hessian rows of the loss
stage, seed 2, and the quantize stage's calibration rows, seed 0)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from common import CALIB_TEXT

REFINE_POSITIONS = 512          # positions per row whose KLD the search reads (the head costs per position)


def _library(loaded, work: Path, config, plan, label: str):
    """{tensor: {option: W_dq}} of the candidates, rounded on the Hessians of quantize's walk of `plan` on the rows
    the quantize stage calibrates on (16 x 512, seed 0): made once per starting plan (work/plan-<B>+fisher.library.pt,
    shared by searches of any length from it)."""
    import torch

    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.analysis.refine import round_all, walked_hessians
    from lowbit.quantize import calibration_samples

    path = work / f"{label.split('+refine')[0]}.library.pt"
    if path.exists():
        return torch.load(path), path
    samples = calibration_samples(loaded, read_text(str(CALIB_TEXT)), CalibConfig(16, 512, 0))
    library = round_all(loaded.model, [c.name for c in plan.choices], config.candidates(), config.outlier_shares,
                        config.outlier_beside(), walked_hessians(loaded, plan, samples))
    torch.save(library, path)
    return library, path


def refined_plan(a, work: Path, label: str, plan, config, evals: int) -> None:
    """Refine `plan` (the knapsack's, PlannerConfig `config`) by the measured search; writes work/<label>.yaml and
    work/<label>.plan.json (the summary with the search's record)."""
    import torch

    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.models.load import load
    from lowbit.analysis.refine import AssembledKLD, refine
    from lowbit.plans.search import SearchConfig
    from lowbit.quantize import calibration_samples

    loaded = load(a.model)
    start = time.perf_counter()
    with torch.no_grad():
        library, lib_path = _library(loaded, work, config, plan, label)
        library_s, start = time.perf_counter() - start, time.perf_counter()
        rows = calibration_samples(loaded, read_text(str(CALIB_TEXT)), CalibConfig(*a.refine_rows, 3))
        scorer = AssembledKLD(loaded.model, rows, REFINE_POSITIONS)
        # no held-out check here: the rows record the search's own plan (the CLI checks it on other rows)
        new, result, _ = refine(plan, loaded.model, library, scorer, config, SearchConfig(evals=evals))
    new.format_plan().save(work / f"{label}.yaml")
    summary = {**new.summary(), "search": {
        "start_kld": result.start_loss, "kld": result.loss, "evals": result.evals, "accepted": result.accepted,
        "history": list(result.history), "seconds": time.perf_counter() - start, "library": lib_path.name,
        "library_seconds": library_s if library_s > 1 else None,      # None: the library was read from the cache
        "rows": {"samples": a.refine_rows[0], "seq_len": a.refine_rows[1], "seed": 3, "positions": REFINE_POSITIONS},
        "start_bits_per_weight": plan.bits_per_weight}}
    (work / f"{label}.plan.json").write_text(json.dumps(summary, indent=1))


HOLDOUT_SEED = 4                # held-out rows: the CLI's check (`lowbit plan --refine` keeps the search's plan only if
                                # it is better on them too), here recorded beside the row, never choosing it


def holdout_record(a, work: Path, label: str) -> None:
    """Add to work/<label>.plan.json the KLD of the knapsack's plan and of the refined one, both assembled from the
    cached library, on --refine-rows validation rows of HOLDOUT_SEED (rows the search never read): what the
    CLI's held-out check would have seen. Done once per row."""
    path = work / f"{label}.plan.json"
    summary = json.loads(path.read_text())
    if "holdout" in summary["search"]:
        return
    import torch

    from lowbit.analysis.refine import AssembledKLD, Assembly
    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.models.load import load
    from lowbit.plans.plan import FormatPlan
    from lowbit.plans.planner import option_name
    from lowbit.quantize import calibration_samples

    loaded = load(a.model)
    library = torch.load(work / summary["search"]["library"])
    start = time.perf_counter()
    with torch.no_grad():
        rows = calibration_samples(loaded, read_text(str(CALIB_TEXT)), CalibConfig(*a.refine_rows, HOLDOUT_SEED))
        scorer, assembly = AssembledKLD(loaded.model, rows, REFINE_POSITIONS), Assembly(loaded.model, library)
        kld = {}
        try:
            for which, yaml in (("start_kld", label.split("+refine")[0]), ("kld", label)):
                fp = FormatPlan.load(work / f"{yaml}.yaml")
                assembly.set({n: option_name(fp.format_for(n).name, fp.outlier_share(n) or 0.0) for n in library})
                kld[which] = scorer()
        finally:
            assembly.restore()
    summary["search"]["holdout"] = {**kld, "seed": HOLDOUT_SEED, "seconds": time.perf_counter() - start,
                                    "kept": "search" if kld["kld"] < kld["start_kld"] else "start"}
    path.write_text(json.dumps(summary, indent=1))
