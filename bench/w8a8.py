"""Weights and activations (issue 24): every W8A8 / W4A8 / W4A4 recipe of lowbit and the peers'
W8A8 rows, on one model, with the same evaluation.

Each lowbit row is `lowbit quantize MODEL --recipe R` in its own process (wall time = quantize
time; calibration: --samples × --seq-len windows of WikiText-2 *validation*), then all rows are
evaluated in batches sharing one float reference pass per window (WikiText-2 raw test, ctx 2048,
the first --windows windows, GPTQ convention, KLD against the float model). The peer rows come from
bench/peers/w8a8_peers.py (evaluated in their own environments with lowbit's eval code, same tokens,
same reference) and are read from bench/results/peers/w8a8/.
LLM.int8() rows also record, per linear, the share of input columns its split sent to the float
path on the evaluation text (mean over forwards).

    python bench/w8a8.py --model smollm2-135m --windows 20
    python bench/w8a8.py --model gemma3-270m --stage quantize    # resumable: then --stage eval
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CALIB_TEXT, EVAL_TEXT, REPO, lowbit_quantize, machine, table, write_json

HERE = Path(__file__).resolve().parent
ROWS = {  # label -> lowbit quantize flags (in the order they are run: the targets first)
    "w8a8-naive": ["--recipe", "w8a8-naive"],
    "llm-int8": ["--recipe", "llm-int8"],
    "w8a8-static": ["--recipe", "w8a8-static"],
    "w8a8-smoothquant": ["--recipe", "w8a8-smoothquant"],
    "w8a8-smoothquant-static": ["--recipe", "w8a8-smoothquant-static"],
    "w4a8-smoothquant": ["--recipe", "w4a8-smoothquant"],
    "w4a4-naive": ["--recipe", "w4a4-naive"],
    "w8a8-smoothquant-search": ["--recipe", "w8a8-smoothquant", "--alpha", "search"],
    "w8a8-smoothquant-o2": ["--recipe", "w8a8-smoothquant-o2"],
    "w4a8-smoothquant-ch": ["--recipe", str(HERE / "recipes" / "w4a8-smoothquant-ch.yaml")],
    "w8a8-smoothquant-static-search": ["--recipe", "w8a8-smoothquant-static", "--alpha", "search"],
}
PEERS = REPO / "bench" / "results" / "peers" / "w8a8"


def act_bits(flags: list[str]) -> int:
    from lowbit.recipes import load_recipe

    return load_recipe(flags[1]).activations.default.bits


def outlier_shares(model) -> dict:
    """{linear: mean share of input columns sent to float per forward} of LLM.int8() linears."""
    from lowbit.nn.qlinear import QuantLinear

    return {name: float(m.outliers.sum()) / max(m.forwards, 1) / m.in_features
            for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.act is not None and m.act.outlier_threshold is not None}


def evaluate(model_name: str, dirs: dict, windows: int, ctx: int, batch: int) -> dict:
    """{label: eval record} of the directories (None: the float model), `batch` models per reference pass."""
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.models.load import load

    fp = load(model_name)
    ids = tokenize(fp.tokenizer, read_text(EVAL_TEXT).text)
    out = {}
    names = list(dirs)
    for start in range(0, len(names), batch):
        chunk = names[start:start + batch]
        models = {n: (fp.model if dirs[n] is None else load(str(dirs[n])).model) for n in chunk}
        results = evaluate_many(models, ids, ctx, windows, reference=fp.model, reference_name=model_name)
        for n in chunk:
            r = results[n]
            out[n] = {"ppl": r.ppl, "kld": r.kld.mean, "kld_p99": r.kld.p99, "top1_changed": r.kld.top1_changed,
                      "eval_tokens": r.tokens, "eval_windows": r.windows, "eval_seconds": r.seconds}
            shares = outlier_shares(models[n])
            if shares:
                out[n]["outlier_column_share"] = shares
            yield n, out[n]
        del models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--stage", default="all", choices=("quantize", "eval", "all"),
                   help="quantize: the rows not yet quantized under --work; eval: the quantized rows not yet "
                        "evaluated, then the JSON; all: both")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="models evaluated per reference pass (memory)")
    p.add_argument("--work", default=str(Path.home() / ".cache/lowbit/bench/w8a8"))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    path = Path(a.json or REPO / "bench" / "results" / f"w8a8_{a.model}.json")
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    if a.stage in ("quantize", "all"):
        for label in a.rows:
            record = work / f"{label}.quantize.json"
            if record.exists():
                continue
            flags = ROWS[label] + ["--calib", str(CALIB_TEXT), "--samples", str(a.samples), "--seq-len", str(a.seq_len)]
            print(f"quantize {label} ...", flush=True)
            rec = lowbit_quantize(a.model, flags, work / label, threads=2)
            record.write_text(json.dumps({
                "model": a.model, "row": label, "tool": "lowbit", "flags": ROWS[label],
                "weight_bits": rec["bits_per_weight"], "act_bits": act_bits(ROWS[label]),
                "weight_format": rec["format"], "quantize_seconds": rec["wall_seconds"],
                "peak_rss_mib": rec["peak_rss_mib"], "load_average": rec["load_average"],
                "calibration": f"{a.samples} x {a.seq_len}"}))
    if a.stage == "quantize":
        return
    labels = ["float"] + [r for r in a.rows if (work / f"{r}.quantize.json").exists()]
    todo = {r: (None if r == "float" else work / r) for r in labels if not (work / f"{r}.eval.json").exists()}
    start = time.perf_counter()
    for label, result in evaluate(a.model, todo, a.windows, a.ctx, a.batch) if todo else ():
        (work / f"{label}.eval.json").write_text(json.dumps(result))
        print(f"evaluated {label}: ppl {result['ppl']:.3f}", flush=True)
    fp = {"model": a.model, "row": "float", "tool": "float", "weight_bits": 32, "act_bits": 32,
          **json.loads((work / "float.eval.json").read_text())}
    rows = [{**json.loads((work / f"{r}.quantize.json").read_text()), **json.loads((work / f"{r}.eval.json").read_text())}
            for r in labels[1:]]
    peers = [json.loads(f.read_text()) for f in sorted(PEERS.glob(f"*_{a.model}.json"))] if PEERS.is_dir() else []
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
    write_json(path, {"bench": "w8a8", "model": a.model, "machine": machine(),
                      "eval": {"text": str(EVAL_TEXT), "ctx": a.ctx, "windows": a.windows, "kld_ref": a.model},
                      "calibration": {"text": str(CALIB_TEXT), "samples": a.samples, "seq_len": a.seq_len},
                      "eval_wall_seconds": time.perf_counter() - start, "rows": all_rows})
    print(table(["row", "ppl", "+ppl", "KLD", "KLD p99", "top-1", "W bits", "A bits", "seconds"],
                [[r["row"] if "row" in r else r.get("peer"), r.get("ppl"), f"{100 * r['ppl_increase']:.2f}%"
                  if "ppl_increase" in r else str(r.get("error", "-"))[:60], r.get("kld"), r.get("kld_p99"),
                  r.get("top1_changed"), r.get("weight_bits"), r.get("act_bits"), r.get("quantize_seconds")]
                 for r in all_rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
