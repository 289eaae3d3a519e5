"""lowbit's evaluation loop against a plain transformers forward loop over the same windows.

Also times the per-window scoring against a reference (ppl + KLD for K models sharing one
reference): the definitions (cross_entropy + token_kld per model) against the fast path
(ReferenceWindow once, token_scores per model), on the model's own logits of the first window.

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


def scoring_seconds(logits_ref, targets, models: int) -> tuple[float, float, float]:
    """Seconds per model-window to score `models` models against one reference: by the
    definitions, and by the fast path (its reference pass shared); and the largest KL gap."""
    import torch

    from lowbit.eval.kld import ReferenceWindow, token_kld, token_scores

    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    ref = ReferenceWindow(logits_ref)
    t_slow, t_fast, gap = 0.0, time.perf_counter() - start, 0.0
    for _ in range(models):        # one stand-in model's logits at a time (timing does not depend on values)
        z = logits_ref + 0.1 * torch.randn(logits_ref.shape, generator=g)
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(z, targets)
        kl_def = token_kld(logits_ref, z)[0]
        t_slow += time.perf_counter() - start
        start = time.perf_counter()
        kl = token_scores(z, targets, ref)[1]
        t_fast += time.perf_counter() - start
        gap = max(gap, float((kl - kl_def).abs().max()))
        del z
    t_slow, t_fast = t_slow / models, t_fast / models
    return t_slow, t_fast, gap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default=str(EVAL_TEXT))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--kld-models", type=int, default=6, help="models scored against one reference")
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

    import torch
    with torch.no_grad():
        window = ids[: args.ctx]
        logits_ref = loaded.model(window[None]).logits[0, :-1]       # [ctx-1, V]
    t_slow, t_fast, gap = scoring_seconds(logits_ref, window[1:], args.kld_models)
    scoring = [["cross_entropy + token_kld per model (definitions)", t_slow, 1.0],
               [f"ReferenceWindow once + token_scores per model ({args.kld_models} models)", t_fast, t_fast / t_slow]]
    print(table(["ppl + KLD scoring", "s per model-window", "time ratio"], scoring))
    print(f"vocabulary {logits_ref.shape[1]}, {logits_ref.shape[0]} predictions; largest per-token KL gap {gap:.2e}")
    write_json(Path(args.json), {"bench": "eval_speed", "model": args.model, "text": args.text, "ctx": args.ctx,
                                 "windows": args.windows, "tokens": ours.tokens, "machine": machine(),
                                 "rows": [dict(zip(["loop", "ppl", "seconds", "ratio"], r)) for r in rows],
                                 "scoring": {"vocabulary": logits_ref.shape[1], "models": args.kld_models,
                                             "max_kl_gap": gap,
                                             "rows": [dict(zip(["scoring", "seconds_per_model_window", "ratio"], r))
                                                      for r in scoring]}})


if __name__ == "__main__":
    main()
