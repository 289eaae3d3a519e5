"""The machinery of the recipe benches (w8a8.py, rotations.py): each row is `lowbit quantize MODEL
FLAGS` in its own process (wall time = quantize time; calibration from WikiText-2 *validation*),
then every row is evaluated in batches that share one float reference pass per window (WikiText-2
raw test, ctx 2048, KLD against the float model). Resumable: a row's quantize and eval records sit
beside its directory under WORK/MODEL/ and are not redone.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CALIB_TEXT, EVAL_TEXT, lowbit_quantize, machine, table, write_json


def add_args(p: argparse.ArgumentParser, rows: dict, work: str) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="*", default=list(rows), choices=list(rows))
    p.add_argument("--stage", default="all", choices=("quantize", "eval", "all"),
                   help="quantize: the rows not yet quantized under --work; eval: the quantized rows not yet "
                        "evaluated, then the JSON; all: both")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="models evaluated per reference pass (memory)")
    p.add_argument("--work", default=str(Path.home() / ".cache/lowbit/bench" / work))
    p.add_argument("--json", default=None)


def quantize_rows(a, rows: dict, work: Path, describe) -> None:
    """Quantize each of a.rows not yet recorded; describe(flags) -> extra fields of its record."""
    for label in a.rows:
        record = work / f"{label}.quantize.json"
        if record.exists():
            continue
        own = "--samples" in rows[label]       # a row with its own calibration size keeps it
        calib = [] if own else ["--samples", str(a.samples), "--seq-len", str(a.seq_len)]
        flags = rows[label] + ["--calib", str(CALIB_TEXT), *calib]
        print(f"quantize {label} ...", flush=True)
        rec = lowbit_quantize(a.model, flags, work / label, threads=2)
        record.write_text(json.dumps({
            "model": a.model, "row": label, "tool": "lowbit", "flags": rows[label],
            "weight_bits": rec["bits_per_weight"], **describe(rows[label]),
            "weight_format": rec["format"], "quantize_seconds": rec["wall_seconds"],
            "peak_rss_mib": rec["peak_rss_mib"], "load_average": rec["load_average"],
            "calibration": (" x ".join(rows[label][rows[label].index(k) + 1] for k in ("--samples", "--seq-len"))
                            if own else f"{a.samples} x {a.seq_len}")}))


def evaluate_dirs(model_name: str, dirs: dict, windows: int, ctx: int, batch: int, extra=None):
    """Yields (label, eval record) of the directories (None: the float model), `batch` models per
    reference pass; extra(model) -> more fields of a record (or {})."""
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.models.load import load

    fp = load(model_name)
    ids = tokenize(fp.tokenizer, read_text(EVAL_TEXT).text)
    names = list(dirs)
    for start in range(0, len(names), batch):
        chunk = names[start:start + batch]
        models = {n: (fp.model if dirs[n] is None else load(str(dirs[n])).model) for n in chunk}
        results = evaluate_many(models, ids, ctx, windows, reference=fp.model, reference_name=model_name)
        for n in chunk:
            r = results[n]
            yield n, {"ppl": r.ppl, "kld": r.kld.mean, "kld_p99": r.kld.p99, "top1_changed": r.kld.top1_changed,
                      "eval_tokens": r.tokens, "eval_windows": r.windows, "eval_seconds": r.seconds,
                      **(extra(models[n]) if extra else {})}
        del models


def evaluate_rows(a, work: Path, extra=None) -> list[str]:
    """Evaluate the quantized rows (and float) not yet evaluated; returns the labels, float first."""
    labels = ["float"] + [r for r in a.rows if (work / f"{r}.quantize.json").exists()]
    todo = {r: (None if r == "float" else work / r) for r in labels if not (work / f"{r}.eval.json").exists()}
    for label, result in evaluate_dirs(a.model, todo, a.windows, a.ctx, a.batch, extra) if todo else ():
        (work / f"{label}.eval.json").write_text(json.dumps(result))
        print(f"evaluated {label}: ppl {result['ppl']:.3f}", flush=True)
    return labels


def assemble(a, bench: str, work: Path, labels: list[str], peers: list[dict], path: Path, start: float,
             columns: dict) -> None:
    """The JSON (float row, lowbit rows, peers; ppl increase against this run's float) and a table;
    columns: {header: row -> value} after row and ppl."""
    fp = {"model": a.model, "row": "float", "tool": "float", "weight_bits": 32, "act_bits": 32,
          **json.loads((work / "float.eval.json").read_text())}
    rows = [{**json.loads((work / f"{r}.quantize.json").read_text()), **json.loads((work / f"{r}.eval.json").read_text())}
            for r in labels[1:] if (work / f"{r}.eval.json").exists()]
    all_rows = [fp] + rows + peers
    for row in all_rows:
        if row.get("ppl") is None:
            continue
        if row.get("eval_windows", a.windows) != a.windows:   # another set of windows: no ratio to this float
            row["note"] = (f"evaluated on {row['eval_windows']} windows, this run's float row on {a.windows}: "
                           "its ppl is not comparable here (KLD is per token)")
            row.pop("ppl_increase", None)
            continue
        row["ppl_increase"] = row["ppl"] / fp["ppl"] - 1
    write_json(path, {"bench": bench, "model": a.model, "machine": machine(),
                      "eval": {"text": str(EVAL_TEXT), "ctx": a.ctx, "windows": a.windows, "kld_ref": a.model},
                      "calibration": {"text": str(CALIB_TEXT), "samples": a.samples, "seq_len": a.seq_len},
                      "eval_wall_seconds": time.perf_counter() - start, "rows": all_rows})
    print(table(["row", "ppl", "+ppl", *columns],
                [[r["row"] if "row" in r else r.get("peer"), r.get("ppl"), f"{100 * r['ppl_increase']:.2f}%"
                  if "ppl_increase" in r else str(r.get("error", "-"))[:60], *(f(r) for f in columns.values())]
                 for r in all_rows]))
    print(f"wrote {path}")
