"""`lowbit compare`: a grid of methods × formats (and recipes) on one model, each cell scored against the
same float model; results.json, results.md and compare.html in --out; cells cached there by key."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import LowbitError

STATE = "compare.json"


def add_parser(sub) -> None:
    from ..compare.grid import DEFAULT_FORMATS, DEFAULT_METHODS

    p = sub.add_parser("compare", help="every method × format on your model: a table and a Pareto plot",
                       description="Quantize the model once per cell of methods × formats (and each recipe), score "
                                   "every cell against the same float model on the same windows, and write "
                                   "results.json, results.md and compare.html (perplexity or KLD against bits per "
                                   "weight, the Pareto front drawn). Each cell is cached in --out by its settings and "
                                   "the model's hash: an interrupted compare resumes, a wider one runs only what is new.")
    p.add_argument("model", help="a model name, a .gguf file or an HF directory (a float model)")
    p.add_argument("--calib", required=True, metavar="PATH", help="calibration text (the evaluation text is refused)")
    p.add_argument("--text", required=True, metavar="PATH", help="evaluation text (a file or an HF dataset name)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the results and the cell cache go")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma-separated (default {','.join(DEFAULT_FORMATS)})")
    p.add_argument("--recipes", default="", help="comma-separated recipe names or files, added to the grid")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.set_defaults(run=run)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..compare.grid import cell_key, grid, run_cell
    from ..compare.report import html, markdown
    from ..data.text import read_text
    from ..eval.perplexity import evaluate, make_windows, tokenize
    from ..models.load import load

    cells = grid(_split(args.methods), _split(args.formats), _split(args.recipes))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file")
    calib, text = read_text(args.calib), read_text(args.text)
    if calib.is_eval_text:
        raise LowbitError(f"--calib {args.calib} is the evaluation text: calibrate on other text")
    fp = load(args.model)
    ids = tokenize(fp.tokenizer, text.text)
    try:
        make_windows(ids, args.ctx, args.windows)
    except LowbitError as e:
        raise LowbitError(f"--text: {e}") from None
    identity = {"model_sha256": fp.sha256, "calib_sha256": calib.sha256, "text_sha256": text.sha256,
                "samples": args.samples, "seq_len": args.seq_len, "windows": args.windows, "ctx": args.ctx}
    state_file = out / STATE
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if old.get("model_sha256") != fp.sha256:
            raise LowbitError(f"--out {out} holds a compare of another model ({old.get('model', '?')}): "
                              "use another directory")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)
    state_file.write_text(json.dumps({"model": args.model, "model_sha256": fp.sha256}, indent=1))
    reference = evaluate(fp.model, ids, args.ctx, args.windows, progress=False)
    score = lambda q: _score(q.model, fp.model, ids, args)
    calib_flags = ["--calib", args.calib, "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    rows, todo = [], []
    for cell in cells:
        path = out / "cells" / f"{cell_key(cell, identity)}.json"
        (rows if path.exists() else todo).append((cell, path))
    bar = tqdm(todo, desc="compare", unit="cell")
    for cell, path in bar:
        bar.set_postfix_str(cell.label)
        start = time.perf_counter()
        result = run_cell(cell, args.model, calib_flags, out / "plans", score)
        result.update(seconds=time.perf_counter() - start)
        path.write_text(json.dumps({"cell": vars(cell), **result}, indent=1))
    rows = []
    for cell in cells:
        record = json.loads((out / "cells" / f"{cell_key(cell, identity)}.json").read_text())
        family = (cell.format or "recipe").split("-")[0]
        rows.append({**record, "label": cell.label, "method": cell.method or "recipe", "family": family,
                     "command": cell.command(args.model, args.calib, args.samples, args.seq_len)})
    settings = (f"{args.model}; evaluation {text.origin}, {args.windows} windows of {args.ctx}; calibration "
                f"{calib.origin}, {args.samples} × {args.seq_len}; float perplexity {reference.ppl:.4f}")
    (out / "results.json").write_text(json.dumps({"model": args.model, **identity, "float_ppl": reference.ppl,
                                                  "cells": rows}, indent=1))
    (out / "results.md").write_text(f"# lowbit compare: {args.model}\n\n{settings}\n\n" + markdown(rows, reference.ppl))
    (out / "compare.html").write_text(html(args.model, rows, reference.ppl, settings))
    print(markdown(rows, reference.ppl))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'compare.html'} "
          f"({len(todo)} cells run, {len(cells) - len(todo)} from the cache)")
    return 0


def _score(model, reference, ids, args) -> dict:
    from ..eval.perplexity import evaluate

    r = evaluate(model, ids, args.ctx, args.windows, reference=reference, reference_name="float", progress=False)
    return {"ppl": r.ppl, "kld": r.kld.mean, "kld_p99": r.kld.p99, "top1_changed": r.kld.top1_changed}
