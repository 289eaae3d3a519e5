"""KV cache (issue 26), lowbit's rows so far: perplexity, KLD and stored bits of each cache setting on
one model, every setting evaluated on the same windows against the float cache in one pass per window
(lowbit.kv.attention: each window's tokens read the quantized K/V of every earlier token of that
window, as token-by-token generation's cache would hold them). Bits per cached value are measured
from the packed codec on the window's own K (bytes × 8 / values), side data included.
Not yet here (the issue's rest): the peers, passkey accuracy, tokens/s and RSS in generation, ctx 8192.

    python bench/kv_cache.py --model smollm2-135m [--windows 20] [--ctx 2048] [--rows ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from common import EVAL_TEXT, REPO, machine, table, write_json

from lowbit.kv.config import KvCacheConfig

ROWS = {   # label -> KvCacheConfig (None: the float cache)
    "float": None,
    "int8": KvCacheConfig("int", 8),
    "int4": KvCacheConfig("int", 4),
    "int2": KvCacheConfig("int", 2),
    "int4-kchannel": KvCacheConfig("int", 4, axis="channel", group=32),
    "int2-kchannel": KvCacheConfig("int", 2, axis="channel", group=32),
    "kivi4-r128": KvCacheConfig("kivi", 4, residual=128),
    "kivi2-r128": KvCacheConfig("kivi", 2, residual=128),
    "turboquant3.5": KvCacheConfig("turboquant", 3.5),
    "turboquant2.5": KvCacheConfig("turboquant", 2.5),
    "turboquant3.5-qjl": KvCacheConfig("turboquant", 3.5, qjl=True),
    "turboquant2.5-qjl": KvCacheConfig("turboquant", 2.5, qjl=True),
}


class CacheView(nn.Module):
    """`base` whose attention reads K/V through `config` (None: the float cache) while it runs."""

    def __init__(self, base: nn.Module, spec, config: KvCacheConfig | None):
        super().__init__()
        self.base, self.spec, self.kv = [base], spec, config
        self.config = base.config

    def forward(self, *args, **kwargs):
        base = self.base[0]
        for layer in base.get_submodule(self.spec.layers):
            layer.get_submodule(self.spec.attention).lowbit_kvcache = self.kv
        return base(*args, **kwargs)


def bits_per_value(config: KvCacheConfig | None, loaded, ids: torch.Tensor) -> float:
    """Stored bits per cached value under `config`: layer 0's K of the first 512 tokens encoded by the
    K and the V codec (the stored size depends on the shapes and the method, not on the values)."""
    from lowbit.kv.codec import KvCodec

    if config is None:
        return 8.0 * next(loaded.model.parameters()).element_size()
    seen = {}
    attention = loaded.model.get_submodule(loaded.spec.layers)[0].get_submodule(loaded.spec.attention)
    k_proj = attention.get_submodule("k_proj")
    h = k_proj.register_forward_hook(lambda m, a, out: seen.setdefault("k", out))
    with torch.no_grad():
        loaded.model(input_ids=ids[None, :512], use_cache=False)
    h.remove()
    D = attention.head_dim
    k = seen["k"].view(1, 512, -1, D).transpose(1, 2)          # [1, T, kv*D] -> [1, kv, T, D]
    total = 0
    for which in "kv":
        codec = KvCodec(config, D, 0, which)
        total += codec.encode(k).nbytes
    return total * 8 / (2 * k.numel())


def main() -> None:
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.kv.attention import install_kv_cache
    from lowbit.models.load import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    path = Path(a.json or REPO / "bench" / "results" / f"kv_cache_{a.model}.json")
    loaded = load(a.model)
    ids = tokenize(loaded.tokenizer, read_text(EVAL_TEXT).text)
    bits = {r: bits_per_value(ROWS[r], loaded, ids) for r in a.rows}
    reference = load(a.model).model                        # a second copy: the float cache, plain SDPA
    install_kv_cache(loaded.model, loaded.spec, KvCacheConfig("int", 8))
    views = {r: CacheView(loaded.model, loaded.spec, ROWS[r]) for r in a.rows}
    start = time.perf_counter()
    results = evaluate_many(views, ids, a.ctx, a.windows, reference=reference, reference_name=f"{a.model} float cache")
    rows, fp = [], results.get("float")
    for r in a.rows:
        res, cfg = results[r], ROWS[r]
        rows.append({"model": a.model, "row": r, "tool": "lowbit", "kv_cache": cfg.to_dict() if cfg else None,
                     "ppl": res.ppl, "kld": res.kld.mean, "kld_p99": res.kld.p99, "top1_changed": res.kld.top1_changed,
                     "bits_per_value": bits[r], "eval_windows": res.windows, "eval_seconds": res.seconds,
                     **({"ppl_increase": res.ppl / fp.ppl - 1} if fp else {})})
    write_json(path, {"bench": "kv_cache", "model": a.model, "machine": machine(),
                      "eval": {"text": str(EVAL_TEXT), "ctx": a.ctx, "windows": a.windows, "kld_ref": "float cache",
                               "convention": results[a.rows[0]].convention},
                      "eval_wall_seconds": time.perf_counter() - start, "rows": rows})
    print(table(["row", "ppl", "+ppl", "KLD", "bits/value"],
                [[r["row"], r["ppl"], f"{100 * r.get('ppl_increase', 0):.2f}%", r["kld"], r["bits_per_value"]]
                 for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
