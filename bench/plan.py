"""Planner (issue 27): `lowbit plan`'s per-tensor plans at target sizes, quantized by GPTQ within the plan,
beside uniform GPTQ rows quantized the same way in the same run, and dense-and-sparse / OWQ-column rows on
top of W3 and W2 (issue 27's parts 3 and 4); and how well the cheap proxy ranks the (tensor, format)
pairs against their measured KLD.

Stages (resumable; records under --work/MODEL/; the loss stages in bench/plan_losses.py):
  losses   every decoder linear × candidate format: KLD when that tensor alone is rounded (probe rows of
           WikiText-2 *validation*) and the Hessian-weighted proxy on the same rows; Spearman's rank
           correlation of the two, over all pairs and within each format.
  outliers the same KLD for each (tensor, 2- or 3-bit format + outlier share) option (--outlier-shares).
  gptq     the KLD with each (tensor, format) rounded by GPTQ instead (`lowbit plan --loss kld-gptq`; GPTQ's
           Hessians from 16 × 512 other validation rows), for the default candidates and two more
           (int3-g128, int5-g64: finer steps between the sizes).
  fisher   the KLD of the GPTQ roundings predicted from one gradient pass (`lowbit plan --loss fisher`:
           ½ Σ_i g_i (E H_g Eᵀ)_ii on 4 × 2048 validation rows, GPTQ's Hessians from 16 × 512 others), for the
           default candidates, WIDE_FORMATS and FINE_FORMATS, and OUTLIER_FORMATS with each --outlier-shares
           share kept in float16 (a cached file of fewer options is extended), and the same prediction for the
           roundings to nearest ranked against their measured KLDs (as the proxy).
  plans    the knapsack at each --targets bits per weight (measured KLD as the loss): plan-<B>.yaml,
           plan-<B>+outliers.yaml with the dense-and-sparse options in the knapsack too, plan-<B>+gptq-losses
           (the GPTQ-rounded KLDs, default candidates), plan-<B>+gptq-losses+wide (with the two more) and
           plan-<B>+fisher (the Fisher losses, default candidates) and plan-<B>+fisher+fine (the Fisher losses
           with WIDE_FORMATS and FINE_FORMATS among the candidates too); at each --outlier-targets
           plan-<B>+fisher+outliers and plan-<B>+fisher+fine+outliers, the same with the dense-and-sparse options;
           with --more, plan-<B>+fisher+more (the +fine candidates and MORE_FORMATS); at each --refine-targets
           plan-<B>+fisher+refine, the +fisher plan refined by the measured search (bench/plan_refine.py).
  quantize `lowbit quantize MODEL --plan plan-<B>.yaml --method gptq` and the uniform rows, each in its own
           process (calibration from WikiText-2 validation).
  eval     WikiText-2 raw test, ctx 2048, 20 windows, KLD against the float model; then the JSON.

    python bench/plan.py --model smollm2-135m [--targets 2.5 3.0 3.5 4.25] [--stage quantize|eval|all]
        [--fisher-only] [--no-sparse] [--no-gptq-losses] [--outlier-shares] [--reuse bench/results/plan_M.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO
from plan_losses import (FINE_FORMATS, MORE_FORMATS, OUTLIER_FORMATS, WIDE_FORMATS, fisher_stage, gptq_losses,
                         losses, outlier_losses, tensors)
from plan_refine import holdout_record, refined_plan
from recipe_rows import add_args, assemble, evaluate_rows, quantize_rows

# uniform GPTQ rows; int2-g32, int2-g16 and int3-g32 sit exactly at the 2.5, 3.0 and 3.5-bit targets (a float16
# scale per group of 32 or 16), so every plan has a uniform row of its own size
UNIFORM = {f"uniform-{f}": ["--method", "gptq", "--format", "int", "--bits", b, "--group", g]
           for f, b, g in (("int2-g64", "2", "64"), ("int2-g32", "2", "32"), ("int2-g16", "2", "16"),
                           ("int3-g64", "3", "64"), ("int3-g32", "3", "32"), ("int3-g128", "3", "128"),
                           ("int4-g128", "4", "128"), ("int4-g64", "4", "64"))}
# dense-and-sparse on top of W3 and W2 (single weights, 48 bits each), and OWQ's float16 columns at about the
# same added bits (a column of 576 rows costs 16 bits per weight: 1.5% of the columns ≈ 0.5% of the weights)
SPARSE = {f"{base}+{share}": UNIFORM[f"uniform-{base}"] + ["--outliers", share]
          for base in ("int3-g64", "int2-g64") for share in ("0.1%", "0.5%", "1%")}
SPARSE.update({f"{base}+cols{share}": UNIFORM[f"uniform-{base}"] + ["--outliers", share, "--outlier-layout", "columns"]
               for base in ("int3-g64", "int2-g64") for share in ("1.5%",)})


def plans(a, work: Path, found: dict, with_outliers: dict | None, with_gptq: dict | None,
          with_fisher: dict | None = None) -> dict:
    """plan-<B>.yaml per target (measured KLD as the loss), plan-<B>+outliers.yaml with the
    dense-and-sparse options in the knapsack too, and the plans on the GPTQ-rounded KLDs; {label: flags}."""
    from lowbit.plans.planner import PlannerConfig, plan_bits

    rows = {}
    formats = tuple(found["formats"])
    kinds = ([("", found["kld"], (), a.targets, formats)] if "kld" in found else []) + (
        [("+outliers", with_outliers["kld"], tuple(with_outliers["shares"]), a.outlier_targets, formats)]
        if with_outliers else []) + (
        [("+gptq-losses", with_gptq["kld"], (), a.targets, formats),
         ("+gptq-losses+wide", with_gptq["kld"], (), a.targets, tuple(with_gptq["formats"]))] if with_gptq else []) + (
        [("+fisher", with_fisher["kld"], (), a.targets, formats),
         *([("+fisher+fine", with_fisher["kld"], (), a.targets, (*formats, *WIDE_FORMATS, *FINE_FORMATS))]
           if a.fine else []),
         *([("+fisher+more", with_fisher["kld"], (), a.targets,
             (*formats, *WIDE_FORMATS, *FINE_FORMATS, *MORE_FORMATS))] if a.fine and a.more else [])]
        if with_fisher else [])
    fisher_shares = tuple(a.outlier_shares or ()) if with_fisher else ()
    if fisher_shares and set(fisher_shares) <= set(with_fisher.get("shares", [])):
        kinds += [("+fisher+outliers", with_fisher["kld"], fisher_shares, a.outlier_targets, formats),
                  *([("+fisher+fine+outliers", with_fisher["kld"], fisher_shares, a.outlier_targets,
                      (*formats, *WIDE_FORMATS, *FINE_FORMATS))] if a.fine else [])]
    if with_fisher:
        # the search's length in the label unless the default (48): rows of several lengths side by side
        kinds += [(f"+fisher+refine{evals if evals != 48 else ''}", with_fisher["kld"], (), a.refine_targets, formats)
                  for evals in a.refine_evals]
    for suffix, kld, shares, targets, candidates in kinds:
        for target in targets:
            label = f"plan-{target:g}{suffix}"
            path = work / f"{label}.yaml"
            if not path.exists():
                kind = "fisher" if "fisher" in suffix else "kld-gptq" if "gptq" in suffix else "kld"
                config = PlannerConfig(target, candidates, kind, shares,
                                       OUTLIER_FORMATS if shares else None)
                plan = plan_bits(found["names"], {n: tuple(s) for n, s in found["shapes"].items()}, kld, config)
                if "+refine" in suffix:
                    evals = int(suffix.split("+refine")[1] or 48)
                    refined_plan(a, work, label, plan, config, evals)   # the knapsack's plan, then the search
                else:
                    plan.format_plan().save(path)
                    (work / f"{label}.plan.json").write_text(json.dumps(plan.summary(), indent=1))
            if "+refine" in suffix:
                holdout_record(a, work, label)                          # what the CLI's held-out check would see
            rows[label] = ["--plan", str(path), "--method", "gptq"]
    return rows


EVAL_FIELDS = ("ppl", "kld", "kld_p99", "top1_changed", "eval_tokens", "eval_windows", "eval_seconds")


def reuse_rows(a, work: Path, source: Path) -> list[str]:
    """The rows of an earlier run's JSON this run keeps (its labels), only rows read on this run's windows and
    not named by --only (made by this run): those under work/ already (measured there, or taken by an earlier
    --reuse), and the others' records put under work/ so this run does not redo them, each with `reused_from` —
    every row but float and the uniform ones (never taken from a JSON: re-measured here, so the ratios pair
    rows of this run and show the earlier rows reproduce)."""
    old = json.loads(source.read_text())
    if old.get("model") != a.model or old.get("eval", {}).get("ctx") != a.ctx:
        raise SystemExit(f"--reuse {source}: another model or context ({old.get('model')}, ctx {old.get('eval', {}).get('ctx')})")
    import subprocess

    # the earlier run: the commit that last wrote that JSON (its rows' code and date)
    commit = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", str(source)], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or None
    taken = []
    for row in old["rows"]:
        label = row.get("row")
        record = work / f"{label}.quantize.json"
        if label in (None, "float") or label in (a.only or ()) or row.get("eval_windows") != a.windows:
            continue
        if record.exists():
            taken.append(label)     # under work/ already (measured there, or taken by an earlier --reuse): kept
            continue
        if label.startswith("uniform-"):
            continue                                                # never taken from a JSON: re-measured
        origin = row.get("reused_from") or {"json": str(source.relative_to(REPO) if source.is_relative_to(REPO)
                                                          else source), "last_commit": commit}
        quantized = {k: v for k, v in row.items() if k not in EVAL_FIELDS + ("ppl_increase", "note")}
        record.write_text(json.dumps({**quantized, "reused_from": origin}))
        (work / f"{label}.eval.json").write_text(json.dumps({k: row[k] for k in EVAL_FIELDS if k in row}))
        if label in old.get("plans", {}):
            (work / f"{label}.plan.json").write_text(json.dumps(old["plans"][label], indent=1))
        taken.append(label)
    return taken


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, {}, "plan")
    p.set_defaults(rows=None)
    p.add_argument("--targets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.25])
    p.add_argument("--outlier-shares", type=float, nargs="*", default=[0.005, 0.01],
                   help="dense-and-sparse shares offered to the plan-<B>+outliers rows (none: no such rows)")
    p.add_argument("--outlier-targets", type=float, nargs="*", default=[2.5, 3.0],
                   help="targets of the plan-<B>+outliers rows")
    p.add_argument("--probe-samples", type=int, default=2,
                   help="probe rows for the per-tensor KLDs (2 x 256 tokens: 0.8 s per (tensor, option) on SmolLM2)")
    p.add_argument("--probe-seq-len", type=int, default=256)
    p.add_argument("--no-gptq-losses", dest="gptq_losses", action="store_false",
                   help="skip the plan-<B>+gptq-losses rows")
    p.add_argument("--no-fisher", dest="fisher", action="store_false", help="skip the plan-<B>+fisher rows")
    p.add_argument("--fisher-only", dest="measured", action="store_false",
                   help="no measured per-tensor KLDs (hours on a large vocabulary): the Fisher plans beside the "
                        "uniform and dense-and-sparse rows only")
    p.add_argument("--only", nargs="+", metavar="ROW", default=None,
                   help="quantize, evaluate and report only these rows (the losses and plans are made as usual)")
    p.add_argument("--fisher-rows", type=int, nargs=2, default=[4, 2048], metavar=("N", "L"),
                   help="the Fisher gradient pass's rows: N validation rows of L tokens (default: 4 2048, as "
                        "`lowbit plan`; bench/results/plan_M.json's Fisher rows used 16 512)")
    p.add_argument("--no-fine", dest="fine", action="store_false",
                   help="skip the plan-<B>+fisher+fine rows (and the Fisher losses of FINE_FORMATS)")
    p.add_argument("--more", action="store_true",
                   help="the plan-<B>+fisher+more rows: the +fine candidates and MORE_FORMATS (finer steps above 4 bits)")
    p.add_argument("--refine-targets", type=float, nargs="*", default=[],
                   help="targets of the plan-<B>+fisher+refine rows: the +fisher plan refined by the measured search "
                        "(`lowbit plan --refine`)")
    p.add_argument("--refine-evals", type=int, nargs="+", default=[48],
                   help="the search's evaluations per refined plan, one row per length (a length other than 48 is "
                        "labelled +refine<EVALS>)")
    p.add_argument("--refine-rows", type=int, nargs=2, default=[2, 2048], metavar=("N", "L"),
                   help="validation rows (seed 3) the search judges assembled models on")
    p.add_argument("--no-sparse", dest="sparse", action="store_false",
                   help="without the dense-and-sparse and OWQ-column rows")
    p.add_argument("--reuse", type=Path, default=None, metavar="JSON",
                   help="take the rows of an earlier run's JSON (same model, ctx and windows) as measured, except "
                        "float and the uniform rows, which are re-measured beside the new rows")
    p.set_defaults(stage="all")
    a = p.parse_args()
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if a.measured:
        found = losses(a, work)
        print(f"proxy vs measured KLD, Spearman: {found['spearman_all']:.3f} over all pairs; by format "
              + ", ".join(f"{k} {v:.3f}" for k, v in found["spearman_by_format"].items()), flush=True)
    else:
        found = tensors(a)
    with_outliers = outlier_losses(a, work, found) if a.outlier_shares and a.measured else None
    with_gptq = gptq_losses(a, work, found) if a.gptq_losses and a.measured else None
    with_fisher = fisher_stage(a, work, found) if a.fisher else None
    if with_fisher and "spearman_all" in with_fisher:
        print(f"Fisher loss vs measured KLD (both rounded to nearest), Spearman: {with_fisher['spearman_all']:.3f} over all pairs; "
              "by format " + ", ".join(f"{k} {v:.3f}" for k, v in with_fisher["spearman_by_format"].items()), flush=True)
    rows = {**plans(a, work, found, with_outliers, with_gptq, with_fisher), **UNIFORM, **(SPARSE if a.sparse else {})}
    unknown = set(a.only or ()) - set(rows)
    if unknown:
        raise SystemExit(f"--only: no such row {', '.join(sorted(unknown))} (rows: {', '.join(rows)})")
    a.rows = [r for r in rows if not a.only or r in a.only]
    earlier = json.loads(a.reuse.read_text()) if a.reuse else {}      # read before this run rewrites it
    if a.reuse:
        taken = reuse_rows(a, work, a.reuse.resolve())
        a.rows += [r for r in taken if r not in a.rows]       # rows this run would not make (other stages skipped)
        print(f"kept from {a.reuse} (measured under {work} or taken from the JSON): {', '.join(taken) or 'no row'}",
              flush=True)
    if a.stage in ("quantize", "all"):
        quantize_rows(a, rows, work, lambda flags: {"plan": flags[1] if flags[0] == "--plan" else None})
    if a.stage in ("eval", "all"):
        labels = evaluate_rows(a, work)
        path = Path(a.json or REPO / "bench" / "results" / f"plan_{a.model}.json")
        assemble(a, "plan", work, labels, [], path, start, {"bpw": lambda r: r.get("weight_bits")})
        data = json.loads(path.read_text())
        if a.measured:
            data["proxy_rank"] = {k: found[k] for k in ("spearman_all", "spearman_by_format", "probe", "kld_seconds",
                                                         "proxy_seconds", "timing_note") if k in found}
        if with_gptq:
            data["gptq_losses"] = {k: with_gptq[k] for k in ("formats", "kld_seconds", "hessian_rows")}
        elif "gptq_losses" in earlier:
            data["gptq_losses"] = earlier["gptq_losses"]             # the reused +gptq-losses rows' stage
        if with_fisher:
            data["fisher_rank"] = {k: with_fisher[k] for k in ("formats", "shares", "seconds", "runs", "timing_note", "rows",
                                                                "spearman_all", "spearman_by_format") if k in with_fisher}
            data["fisher_rank"]["definition"] = with_fisher.get("definition", "plain")
        data["plans"] = {label: json.loads((work / f"{label}.plan.json").read_text())
                         for label in a.rows if label.startswith("plan-") and (work / f"{label}.plan.json").exists()}
        path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
