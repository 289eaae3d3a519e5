"""lowbit's evaluation loop against a plain transformers forward loop over the same windows.

    python bench/eval_speed.py --model smollm2-135m --windows 4 --json bench/results/eval_speed.json
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from common import EVAL_TEXT, machine, table, write_json


def plain_transformers(model, ids, ctx: int, windows: int) -> tuple[float, float]:
    """The loop a user would write: forward each window, mean NLL, exp of the mean."""
    import torch

    nlls = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(windows):
            x = ids[i * ctx:(i + 1) * ctx][None]
            logits = model(x).logits
            nlls.append(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls)), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default=str(EVAL_TEXT))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--json", default="bench/results/eval_speed.json")
    args = p.parse_args()

    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate, tokenize
    from lowbit.models.load import load

    loaded = load(args.model)
    ids = tokenize(loaded.tokenizer, read_text(args.text).text)
    plain_transformers(loaded.model, ids, args.ctx, 1)          # warm-up, not timed
    ppl_plain, t_plain = plain_transformers(loaded.model, ids, args.ctx, args.windows)
    ours = evaluate(loaded.model, ids, args.ctx, args.windows, progress=False)
    rows = [["transformers forward loop", ppl_plain, t_plain, 1.0],
            ["lowbit evaluate", ours.ppl, ours.seconds, ours.seconds / t_plain]]
    print(table(["loop", "ppl", "seconds", "time ratio"], rows))
    print(f"{args.model}, {args.text}, ctx {args.ctx}, first {args.windows} windows, {ours.tokens} tokens")
    write_json(Path(args.json), {"bench": "eval_speed", "model": args.model, "text": args.text, "ctx": args.ctx,
                                 "windows": args.windows, "tokens": ours.tokens, "machine": machine(),
                                 "rows": [dict(zip(["loop", "ppl", "seconds", "ratio"], r)) for r in rows]})


if __name__ == "__main__":
    main()
