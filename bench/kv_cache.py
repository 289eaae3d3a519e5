"""KV cache (issue 26): lowbit's cache settings on one model, in four stages that fill one JSON file
(bench/results/kv_cache_<model>.json, rows keyed by setting; the peers are bench/peers/kv_peers.py).

  ppl       perplexity, KLD and top-1 changes of every setting against the float cache, all settings on
            the same windows in one pass per window (lowbit.kv.attention: each window's tokens read the
            quantized K/V of every earlier token of that window, as token-by-token generation's cache holds
            them); bits per cached value measured from the packed codec on the window's own K
            (bytes × 8 / values, side data included). --ctx 2048 --windows 20 by default.
  long      the same at ctx 8192 (SmolLM2's whole context) on --long-windows windows.
  passkey   the passkey prompts of bench/kv_inputs.py answered by greedy generation with the packed cache
            (lowbit.kv.cache.QuantizedKVCache): accuracy overall, per depth and per length.
  generate  `lowbit generate --prompt-file` (8k tokens of context: prompt of 8128, 64 new) in a process of
            its own per setting: decode tokens/s, the cache's bytes per token, peak RSS; ratios against
            the float cache of the same run.
  diagnose  why K resists per-token quantizers (lowbit/kv/diagnose.py): per layer, the attention KL of K
            quantized alone by each K quantizer, with and without its per-channel mean taken out, over
            scale_k's scales or not (key_stats: measured on the calibration text), and
            how much of K is per-channel bias and how alike neighbouring tokens are (one window of
            --diagnose-tokens).

    python bench/kv_cache.py --model smollm2-135m --stage ppl [--windows 20] [--rows ...]
    python bench/kv_cache.py --model smollm2-135m --stage long --stage passkey --stage generate
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from common import CALIB_TEXT, EVAL_TEXT, REPO, machine, run_measured, table

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
    "turboquant4": KvCacheConfig("turboquant", 4),        # the integer rates around 3.5 and 2.5: what the
    "turboquant3.5": KvCacheConfig("turboquant", 3.5),    # outlier-channel split buys between them
    "turboquant3": KvCacheConfig("turboquant", 3),
    "turboquant2.5": KvCacheConfig("turboquant", 2.5),
    "turboquant2": KvCacheConfig("turboquant", 2),
    "turboquant3.5-kcenter": KvCacheConfig("turboquant", 3.5, center_k=True),
    "turboquant2.5-kcenter": KvCacheConfig("turboquant", 2.5, center_k=True),
    "turboquant3.5-kscale": KvCacheConfig("turboquant", 3.5, scale_k=True),   # scales: key_stats()
    "turboquant3.5-kcenter-kscale": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True),
    "turboquant2.5-kcenter-kscale": KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True),
    "turboquant3.5-kcenter-kscale-sink1": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True, sink=1),
    "turboquant2.5-kcenter-kscale-sink1": KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True, sink=1),
    "turboquant3.5-kcenter-kscale-r128": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True, residual=128),
    "turboquant3.5-kcenter-kscale-sink1-r128": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True, sink=1,
                                                             residual=128),
    "turboquant2.5-kcenter-kscale-sink1-r128": KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True, sink=1,
                                                             residual=128),
    "kivi2-sink1-r128": KvCacheConfig("kivi", 2, residual=128, sink=1),
    # K before RoPE (lowbit.kv.rope): centering, scales and kivi's channel groups in a frame that holds still
    "turboquant3.5-prerope-kcenter-kscale-sink1": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True, sink=1,
                                                                pre_rope=True),
    "turboquant2.5-prerope-kcenter-kscale-sink1": KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True, sink=1,
                                                                pre_rope=True),
    "turboquant3.5-prerope-kcenter-kscale-sink1-r128": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True,
                                                                     sink=1, residual=128, pre_rope=True),
    "turboquant2.5-prerope-kcenter-kscale-sink1-r128": KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True,
                                                                     sink=1, residual=128, pre_rope=True),
    "turboquant3.5-prerope-kcenter-kscale-sink16": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True,
                                                                 sink=16, pre_rope=True),
    "kivi2-prerope-sink1-r128": KvCacheConfig("kivi", 2, residual=128, sink=1, pre_rope=True),
    "int4-prerope-kcenter-kscale-sink1": KvCacheConfig("int", 4, center_k=True, scale_k=True, sink=1, pre_rope=True),
    # norms rescaled so each de-quantized vector keeps its projection (no Lloyd–Max shrinkage of scores)
    "turboquant3.5-ncorr-prerope-kcenter-kscale-sink1": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True,
                                                                      sink=1, pre_rope=True, norm_correct="kv"),
    "turboquant2.5-ncorr-prerope-kcenter-kscale-sink1": KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True,
                                                                      sink=1, pre_rope=True, norm_correct="kv"),
    "turboquant3.5-ncorr-prerope-kcenter-kscale-sink1-r128": KvCacheConfig(
        "turboquant", 3.5, center_k=True, scale_k=True, sink=1, residual=128, pre_rope=True, norm_correct="kv"),
    "turboquant2.5-ncorr-prerope-kcenter-kscale-sink1-r128": KvCacheConfig(
        "turboquant", 2.5, center_k=True, scale_k=True, sink=1, residual=128, pre_rope=True, norm_correct="kv"),
    "turboquant3.5-ncorrv-prerope-kcenter-kscale-sink1": KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True,
                                                                       sink=1, pre_rope=True, norm_correct="v"),
    "turboquant2.5-ncorrv-prerope-kcenter-kscale-sink1-r128": KvCacheConfig(
        "turboquant", 2.5, center_k=True, scale_k=True, sink=1, residual=128, pre_rope=True, norm_correct="v"),
    "turboquant3.5-ncorr": KvCacheConfig("turboquant", 3.5, norm_correct="kv"),    # the correction alone
    "int4-kscale": KvCacheConfig("int", 4, scale_k=True),
    "int4-kcenter-kscale": KvCacheConfig("int", 4, center_k=True, scale_k=True),
    "int4-kscale-sink1": KvCacheConfig("int", 4, scale_k=True, sink=1),
    "int4-kcenter-kscale-sink1": KvCacheConfig("int", 4, center_k=True, scale_k=True, sink=1),   # prerope's twin
    "turboquant3.5-qjl": KvCacheConfig("turboquant", 3.5, qjl=True),
    "turboquant2.5-qjl": KvCacheConfig("turboquant", 2.5, qjl=True),
}
MAIN_ROWS = ["float", "int8", "int4", "int2", "kivi4-r128", "kivi2-r128", "turboquant3.5", "turboquant2.5"]
STAGES = ("ppl", "long", "passkey", "generate", "diagnose")


def key_stats(model: str, loaded=None) -> Path:
    """The scale_k rows' q/K statistics of `model` (lowbit.kv.key_scales on the calibration text, the
    measurement `--kv-scale-k CALIB_TEXT` makes), measured once and kept in the model's work folder."""
    import kv_inputs
    from lowbit.data.text import read_text
    from lowbit.kv import key_scales
    from lowbit.models.load import load

    path = kv_inputs.work_dir(model) / "key_stats.safetensors"
    if not path.exists() or key_scales.load(path).k_energy_pre is None:     # older files lack K before RoPE
        loaded = loaded or load(model)
        key_scales.save(key_scales.measure_text(loaded, read_text(CALIB_TEXT)), path, model)
    return path


def row_scales(model: str, config: KvCacheConfig | None, loaded=None) -> dict | None:
    """{layer: [H, D]} K scales for a scale_k row, else None."""
    if config is None or not config.scale_k:
        return None
    from lowbit.kv import key_scales

    return key_scales.load(key_stats(model, loaded)).scales(config.center_k, pre_rope=config.pre_rope)


def row_ropes(config: KvCacheConfig | None, model, spec) -> dict:
    """{layer: Rope} of `model` for a pre_rope row, else {}."""
    from lowbit.kv.rope import layer_ropes

    return layer_ropes(model, spec) if config is not None and config.pre_rope else {}


class CacheView(nn.Module):
    """`base` whose attention reads K/V through `config` (None: the float cache; `scales`: scale_k's) while it runs."""

    def __init__(self, base: nn.Module, spec, config: KvCacheConfig | None, scales: dict | None = None):
        super().__init__()
        self.base, self.spec, self.kv, self.scales = [base], spec, config, scales
        self.ropes = row_ropes(config, base, spec)
        self.config = base.config

    def forward(self, *args, **kwargs):
        base = self.base[0]
        for layer in base.get_submodule(self.spec.layers):
            attention = layer.get_submodule(self.spec.attention)
            attention.lowbit_kvcache = self.kv
            attention.lowbit_kv_scale = self.scales[attention.layer_idx] if self.scales else None
            attention.lowbit_kv_rope = self.ropes[attention.layer_idx] if self.ropes else None
        return base(*args, **kwargs)

    def get_decoder(self):                      # evaluate_many's blocked scoring of long windows
        return self.base[0].get_decoder()

    def get_output_embeddings(self):
        return self.base[0].get_output_embeddings()


def bits_per_value(config: KvCacheConfig | None, loaded, ids: torch.Tensor, scales: dict | None = None) -> float:
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
        codec = KvCodec(config, D, 0, which, scales[0] if scales else None, row_ropes(config, loaded.model, loaded.spec).get(0))
        total += codec.encode(k).nbytes
    return total * 8 / (2 * k.numel())


def perplexity(model: str, rows: list[str], ctx: int, windows: int) -> dict:
    """{row: measured} for one ctx: every row on the same windows, float cache as KLD reference."""
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.kv.attention import install_kv_cache
    from lowbit.models.load import load

    loaded = load(model)
    ids = tokenize(loaded.tokenizer, read_text(EVAL_TEXT).text)
    scales = {r: row_scales(model, ROWS[r], loaded) for r in rows}
    bits = {r: bits_per_value(ROWS[r], loaded, ids, scales[r]) for r in rows}
    reference = load(model).model                        # a second copy: the float cache, plain SDPA
    install_kv_cache(loaded.model, loaded.spec, KvCacheConfig("int", 8))
    views = {r: CacheView(loaded.model, loaded.spec, ROWS[r], scales[r]) for r in rows}
    results = evaluate_many(views, ids, ctx, windows, reference=reference, reference_name=f"{model} float cache")
    fp = results.get("float")
    return {r: {"ppl": res.ppl, "kld": res.kld.mean, "kld_p99": res.kld.p99, "top1_changed": res.kld.top1_changed,
                "bits_per_value": bits[r], "windows": res.windows, "ctx": ctx,
                "tokens_scored": res.windows * (ctx - 1), "seconds": res.seconds,
                "convention": res.convention, **({"ppl_increase": res.ppl / fp.ppl - 1} if fp else {})}
            for r, res in results.items()}


def passkey(model: str, rows: list[str]) -> dict:
    """{row: passkey scores}: kv_inputs' prompts, 8 greedy tokens each with a fresh packed (or float) cache."""
    from safetensors.torch import load_file
    from transformers import DynamicCache

    import kv_inputs
    from lowbit.kv.cache import QuantizedKVCache
    from lowbit.kv.generate import generate_greedy
    from lowbit.models.load import load

    loaded = load(model)
    files, meta = kv_inputs.passkey_inputs(model)
    prompts = load_file(files)
    out = {}
    for r in rows:
        cfg, start, answers = ROWS[r], time.perf_counter(), []
        scales = row_scales(model, cfg, loaded)
        for i in range(len(meta)):
            cache = (QuantizedKVCache.for_model(cfg, loaded.model.config, scales, row_ropes(cfg, loaded.model, loaded.spec) or None) if cfg
                     else DynamicCache(config=loaded.model.config))
            answers.append(loaded.tokenizer.decode(generate_greedy(loaded.model, prompts[f"ids_{i}"], 8, cache).tokens,
                                                   skip_special_tokens=True))
        out[r] = {**kv_inputs.score_passkey(meta, answers), "seconds": time.perf_counter() - start}
        print(f"passkey {r}: {out[r]['accuracy']:.2f} {out[r]['by_length']}", flush=True)
    return out


def diagnosis(model: str, tokens: int) -> dict:
    """lowbit.kv.diagnose on tokens 5000 .. 5000 + `tokens` of the evaluation text."""
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import tokenize
    from lowbit.kv.diagnose import diagnose
    from lowbit.models.load import load

    from lowbit.kv import key_scales

    loaded = load(model)
    ids = tokenize(loaded.tokenizer, read_text(EVAL_TEXT).text)
    start = 5000
    result = diagnose(loaded, ids[start:start + tokens], key_scales.load(key_stats(model, loaded)))
    print(table(["K quantizer", "attention KL", "K centered", "K scaled", "K centered, scaled"],
                [[n, v["plain"], v["centered"], v["scaled"], v["centered_scaled"]] for n, v in result["mean"].items()]))
    print(f"K energy in per-channel means {result['bias_share']:.2f}; "
          f"variance inside 32-token groups / across the window {result['within_group_var']:.2f}")
    return {"window_start": start, "tokens": tokens, **result}


def kv_flags(config: KvCacheConfig | None, model: str = "") -> list[str]:
    """`lowbit generate` flags for a setting (scale_k: the model's saved statistics, key_stats)."""
    if config is None:
        return []
    flags = ["--kv", config.method, "--kv-bits", f"{config.bits:g}", "--kv-residual", str(config.residual)]
    if config.group:
        flags += ["--kv-group", str(config.group)]
    if config.axis != "token":
        flags += ["--kv-axis", config.axis]
    return (flags + (["--kv-sym"] if config.symmetric else []) + (["--kv-qjl"] if config.qjl else [])
            + (["--kv-norm-correct", config.norm_correct] if config.norm_correct else [])
            + (["--kv-center-k"] if config.center_k else []) + (["--kv-pre-rope"] if config.pre_rope else [])
            + (["--kv-sink", str(config.sink)] if config.sink else [])
            + (["--kv-scale-k", str(key_stats(model))] if config.scale_k else []))


def generation(model: str, rows: list[str], threads: int) -> dict:
    """{row: `lowbit generate` after the 8k prompt}, each in its own process (peak RSS)."""
    import tempfile

    import kv_inputs

    prompt, _ = kv_inputs.generation_prompt(model)
    out = {}
    for r in rows:
        with tempfile.TemporaryDirectory() as tmp:
            summary = Path(tmp) / "gen.json"
            wall, rss, _ = run_measured([sys.executable, "-m", "lowbit", "-q", "generate", model, "--prompt-file",
                                         str(prompt), "--max-new-tokens", str(kv_inputs.GEN_NEW), "--json",
                                         str(summary), *kv_flags(ROWS[r], model)], threads)
            rec = json.loads(summary.read_text())
        out[r] = {**{k: rec[k] for k in ("prompt_tokens", "prefill_seconds", "decode_seconds",
                                          "decode_tokens_per_second", "cache_bytes", "text", "rss_after_load_mib",
                                          "generation_peak_rss_mib", "mmap_threshold_pinned") if k in rec},
                  "bytes_per_token": rec["cache_bytes_per_token"], "peak_rss_mib": rss, "wall_seconds": wall, "threads": threads,
                  "command": f"lowbit generate {model} --prompt-file {prompt.name} --max-new-tokens "
                             f"{kv_inputs.GEN_NEW} {' '.join(kv_flags(ROWS[r], model))}".strip()}
        print(f"generate {r}: {out[r]['decode_tokens_per_second']:.1f} tok/s, {out[r]['bytes_per_token']:.0f} B/token, "
              f"{rss} MiB (generation alone: {out[r].get('generation_peak_rss_mib')} MiB)", flush=True)
    if "float" in out:
        for rec in out.values():
            f = out["float"]
            rec.update(tokens_per_second_vs_float=rec["decode_tokens_per_second"] / f["decode_tokens_per_second"],
                       bytes_per_token_vs_float=rec["bytes_per_token"] / f["bytes_per_token"],
                       peak_rss_vs_float=rec["peak_rss_mib"] / f["peak_rss_mib"],
                       **({"generation_peak_rss_vs_float": rec["generation_peak_rss_mib"] / f["generation_peak_rss_mib"]}
                          if rec.get("generation_peak_rss_mib") and f.get("generation_peak_rss_mib") else {}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stage", action="append", choices=STAGES, help="repeatable (default ppl)")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--long-ctx", type=int, default=8192)
    p.add_argument("--long-windows", type=int, default=2)
    p.add_argument("--rows", nargs="*", default=None, choices=list(ROWS),
                   help=f"default: all for ppl, {' '.join(MAIN_ROWS)} for the other stages")
    p.add_argument("--diagnose-tokens", type=int, default=1024, help="the diagnose stage's window (from token 5000)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each `lowbit generate` process")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    path = Path(a.json or REPO / "bench" / "results" / f"kv_cache_{a.model}.json")
    state = json.loads(path.read_text()) if path.exists() else {}
    import kv_inputs

    state.update(bench="kv_cache", model=a.model, machine=machine(), eval_text=str(EVAL_TEXT),
                 values_per_token=kv_inputs.values_per_token(a.model))
    stages = state.setdefault("stages", {})
    for stage in a.stage or ["ppl"]:
        rows = a.rows or (list(ROWS) if stage == "ppl" else MAIN_ROWS)
        start = time.perf_counter()
        if stage == "ppl":
            result = perplexity(a.model, rows, a.ctx, a.windows)
        elif stage == "long":
            result = perplexity(a.model, rows, a.long_ctx, a.long_windows)
        elif stage == "passkey":
            result = passkey(a.model, rows)
        elif stage == "diagnose":
            result = diagnosis(a.model, a.diagnose_tokens)
        else:
            result = generation(a.model, rows, a.threads)
        if stage == "diagnose":                 # one window's diagnosis, replaced as a whole
            merged = stages[stage] = result
        else:
            merged = stages.setdefault(stage, {"rows": {}})
            merged["rows"].update(result)
        merged["wall_seconds_last_run"] = time.perf_counter() - start
        merged["machine"] = machine()           # each stage's own (the top-level one is the last run's)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=1))
        if stage in ("ppl", "long"):
            print(table(["row", "ctx", "ppl", "+ppl", "KLD", "bits/value"],
                        [[r, v["ctx"], v["ppl"], f"{100 * v.get('ppl_increase', 0):.2f}%", v["kld"], v["bits_per_value"]]
                         for r, v in result.items()]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
