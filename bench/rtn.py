"""RTN across formats, with and without MSE clipping: ppl, KLD vs FP, bits/weight, time, peak RSS.

Every quantization runs as `lowbit quantize` in its own process (time and peak RSS are that
process's); evaluation loads the saved directories and runs the float reference once per
window for a batch of models (WikiText-2 raw test, GPTQ convention, first --windows windows).

    python bench/rtn.py --models smollm2-135m gemma3-270m --windows 20 --json bench/results/rtn.json
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import EVAL_TEXT, lowbit_quantize, machine, table, write_json

# (label, CLI flags): the formats the README reports; 4-bit at g128 because the source
# weights already sit on a 4-bit grid (g32 Q4_1 / Q4_K), plus 3- and 2-bit.
SETTINGS = [
    ("W8 per-channel", ["--bits", "8", "--group", "0"]),
    ("W4 g128", ["--bits", "4", "--group", "128"]),
    ("W4 g64", ["--bits", "4", "--group", "64"]),
    ("W3 g128", ["--bits", "3", "--group", "128"]),
    ("W3 g64", ["--bits", "3", "--group", "64"]),
    ("W2 g64", ["--bits", "2", "--group", "64"]),
    ("NF4 g64", ["--format", "nf4", "--group", "64"]),
    ("FP8-E4M3 per-channel", ["--format", "fp8-e4m3", "--group", "0"]),
    ("MXFP4", ["--format", "mxfp4", "--group", "32"]),
]


def share_float_tensors(model, reference) -> None:
    """Point a quantized model's float embedding at the reference's (equal) one to save memory."""
    import torch

    emb, ref = model.get_input_embeddings(), reference.get_input_embeddings()
    if torch.equal(emb.weight, ref.weight):
        emb.weight = ref.weight
        if model.config.tie_word_embeddings:
            model.tie_weights()


def bench_model(name: str, args) -> list[dict]:
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.eval.size import size_report
    from lowbit.models.load import load

    fp = load(name)
    text = read_text(args.text)
    ids = tokenize(fp.tokenizer, text.text)
    work = Path(tempfile.mkdtemp(prefix=f"lowbit-bench-{name}-"))
    rows = [{"model": name, "setting": "FP", "clip": "-", "bits_per_weight": 32.0, "quantize_seconds": None,
             "peak_rss_mib": None, "dir": None}]
    try:
        for label, flags in SETTINGS:
            if args.settings and label not in args.settings:
                continue
            for clip in args.clips:
                out = work / f"{len(rows)}"
                # the absmax grid, as the table was measured (the CLI's default became --scale-rule signed)
                q = lowbit_quantize(name, [*flags, "--scale-rule", "absmax", "--clip", clip], out,
                                    args.quantize_threads)
                rows.append({"model": name, "setting": label, "clip": clip, "format": q["format"],
                             "bits_per_weight": q["bits_per_weight"], "quantize_seconds": q["seconds"],
                             "wall_seconds": q["wall_seconds"], "peak_rss_mib": q["peak_rss_mib"],
                             "load_average": q["load_average"], "dir": str(out)})
                print(f"[{name}] quantized {label} clip={clip}: {q['seconds']:.1f} s", flush=True)
        for start in range(0, len(rows), args.batch):
            batch = rows[start:start + args.batch]
            models = {}
            for row in batch:
                if row["dir"] is None:
                    models[id(row)] = fp.model
                else:
                    quantized = load(row["dir"]).model
                    share_float_tensors(quantized, fp.model)
                    models[id(row)] = quantized
            results = evaluate_many(models, ids, args.ctx, args.windows, reference=fp.model, reference_name=name)
            for row in batch:
                r = results[id(row)]
                row.update(ppl=r.ppl, nll=r.nll, kld=r.kld.mean, kld_p99=r.kld.p99, top1_changed=r.kld.top1_changed,
                           tokens=r.tokens, ctx=r.ctx, windows=r.windows, eval_seconds=r.seconds)
            print(f"[{name}] evaluated {len(rows[:start + args.batch])}/{len(rows)}", flush=True)
            del models
        rows[0]["model_bits_per_weight"] = size_report(fp.model).model_bits_per_weight
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fp_ppl = rows[0]["ppl"]
    for row in rows:
        row["ppl_increase_vs_fp"] = row["ppl"] / fp_ppl - 1
        row.pop("dir")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--text", default=str(EVAL_TEXT))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--settings", nargs="+", default=None, metavar="LABEL",
                   help=f"only these settings (default: all of {', '.join(label for label, _ in SETTINGS)})")
    p.add_argument("--clips", nargs="+", default=["none", "mse"], choices=["none", "mse"])
    p.add_argument("--batch", type=int, default=7, help="models evaluated per pass of the reference")
    p.add_argument("--quantize-threads", type=int, default=None,
                   help="OMP threads of each quantize process (default: torch's default)")
    p.add_argument("--json", default="bench/results/rtn.json")
    args = p.parse_args()
    start = time.time()
    rows = [row for name in args.models for row in bench_model(name, args)]
    headers = ["model", "setting", "clip", "ppl", "Δppl", "KLD", "KLD p99", "top-1 chg", "bits/w", "quant s", "RSS MiB"]
    print(table(headers, [[r["model"], r["setting"], r["clip"], r["ppl"], f"{100 * r['ppl_increase_vs_fp']:+.1f}%",
                           r["kld"], r["kld_p99"], r["top1_changed"], r["bits_per_weight"], r["quantize_seconds"],
                           r["peak_rss_mib"]] for r in rows]))
    print(f"text {args.text}, ctx {args.ctx}, first {args.windows} windows; KLD = mean KL(P_fp || P_q), nats")
    write_json(Path(args.json), {"bench": "rtn", "text": args.text, "ctx": args.ctx, "windows": args.windows,
                                 "machine": machine(), "seconds": time.time() - start, "rows": rows})


if __name__ == "__main__":
    main()
