"""KV-cache peers (issue 26): transformers' QuantizedCache (quanto and HQQ backends) and llama.cpp's
quantized caches, on the model, text and prompts of bench/kv_cache.py (bench/kv_inputs.py).

transformers-{quanto,hqq}-int{4,2}
    QuantizedCache(backend, nbits) with its defaults (axis_key 0, axis_value 0, q_group_size 64,
    residual_length 128), in the peer's own environment (optimum-quanto 0.2.7 / hqq 0.2.8.post1, both
    with transformers 4.57.6), scored in the worker by lowbit's evaluate_many against the same float
    model without a cache (KLD reference). QuantizedCache hands back the float states it was just given
    and re-quantizes its whole store (old codes de-quantized, then the float part with them) whenever the
    float part reaches residual_length, so a one-shot prefill of a window would read nothing quantized:
    each window is fed CHUNK = 64 tokens per call (a generation feeds one), and a token reads the
    quantized store plus the newest 64 to 192 tokens in float (in generation: 0 to 127).
llamacpp-{f32,f16,q8_0,q4_0,q4_1}
    llama.cpp's cache types (-ctk/-ctv; flash attention on, which a quantized V requires) with its own
    llama-perplexity on lowbit's F32 GGUF export; KLD against the same file with an F32 cache. Each
    ubatch's K/V is written to the cache and read back from it (a window's tokens read each other's
    quantized K/V: lowbit's residual 0). llama-perplexity scores the second half of each chunk and adds
    BOS to each (its convention), so its rows are compared through ratios to its own float cache.
Every peer also answers the passkey prompts and generates GEN_NEW tokens after the 8k prompt in a
process of its own (decode tokens/s, cache bytes per token, peak RSS).

    python bench/peers/kv_peers.py --model smollm2-135m [--peer NAME ...] [--windows 20] [--ctx 2048]

Writes bench/results/peers/kv_cache/<peer>_<model>.json; a peer that fails gets a row with "error".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from common import HQQ, QUANTO, REPO, RESULTS, _venv_module, failure_reason, float_dir, run_measured, run_worker

HERE = Path(__file__).resolve().parent
WORKER = HERE / "kv_peer_worker.py"
EVAL = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "test.txt"
OUT = RESULTS / "kv_cache"
LOGS = HERE / "logs"
CHUNK = 64         # tokens per forward call: smaller chunks are closer to generation and slower on this CPU
TRANSFORMERS = {  # peer -> (QuantizedCache backend, venv, requirements, nbits)
    "transformers-quanto-int4": ("quanto", "quanto", QUANTO, 4),
    "transformers-quanto-int2": ("quanto", "quanto", QUANTO, 2),
    "transformers-hqq-int4": ("hqq", "hqq", HQQ, 4),
    "transformers-hqq-int2": ("hqq", "hqq", HQQ, 2),
}
GGML_BITS = {"f32": 32.0, "f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}   # ggml block sizes per value
LLAMACPP = {f"llamacpp-{t}": t for t in GGML_BITS}
PEERS = [*TRANSFORMERS, *LLAMACPP]


# ---------------------------------------------------------------- driver (lowbit's environment)

def _inputs():
    sys.path.insert(0, str(REPO / "bench"))
    import kv_inputs

    return kv_inputs


def run_transformers(peer: str, model: str, a) -> dict:
    backend, venv, requirements, bits = TRANSFORMERS[peer]
    kv = _inputs()
    python = _venv_module().ensure_venv(venv, list(requirements))
    from w8a8_peers import eval_ids

    passkey, meta = kv.passkey_inputs(model)
    _, prompt_ids = kv.generation_prompt(model)
    common = ["--peer", peer, "--float-dir", str(float_dir(model)), "--backend", backend, "--bits", str(bits)]
    row = run_worker(python, WORKER, [*common, "--mode", "eval", "--eval-ids", str(eval_ids(model)),
                                              "--ctx", str(a.ctx), "--windows", str(a.windows),
                                              "--chunk", str(CHUNK), "--passkey", str(passkey)],
                     OUT / f".{peer}_{model}.eval.json", a.threads, LOGS / f"kv_{peer}_{model}.log")
    row["passkey"] = kv.score_passkey(meta, _decode(model, row.pop("passkey_tokens")))
    gen = run_worker(python, WORKER, [*common, "--mode", "generate", "--prompt-ids", str(prompt_ids),
                                              "--new", str(kv.GEN_NEW)],
                     OUT / f".{peer}_{model}.gen.json", a.threads, LOGS / f"kv_{peer}_{model}.gen.log")
    row["generation"] = {**gen, "text": _decode(model, [gen.pop("tokens")])[0]}
    return {"tool": f"transformers QuantizedCache ({backend})", "requirements": list(requirements), **row}


def _decode(model: str, token_lists: list[list[int]]) -> list[str]:
    from lowbit.models.load import load

    tokenizer = load(model).tokenizer
    return [tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]


def run_llamacpp(peer: str, model: str, a) -> dict:
    import llamacpp_tools as llamacpp

    kind = LLAMACPP[peer]
    kv = _inputs()
    gguf = f32_gguf(model)
    root = gguf.parent
    base = root / f"kv-base-c{a.ctx}-n{a.windows}.kld"
    if not base.exists():
        llamacpp._tool("llama-perplexity", ["-m", str(gguf), "-f", str(EVAL), "-c", str(a.ctx), "--chunks",
                                            str(a.windows), "-t", str(a.threads), "-fa", "on", "-ctk", "f32",
                                            "-ctv", "f32", "--kl-divergence-base", str(base)], base.with_suffix(".log"))
    log = root / f"kv-{kind}-c{a.ctx}-n{a.windows}.log"
    args = ["-m", str(gguf), "-c", str(a.ctx), "--chunks", str(a.windows), "-t", str(a.threads), "-fa", "on", "-ctk",
            kind, "-ctv", kind, "--kl-divergence-base", str(base), "--kl-divergence"]
    start, out = time.perf_counter(), _finished_log(log, args)
    reused = out is not None           # the same command finished before (a later step of the peer failed)
    if out is None:
        out = llamacpp._tool("llama-perplexity", args, log)
    found = {k: re.search(p, out) for k, p in llamacpp.KLD_FIELDS.items()}
    if missing := [k for k, m in found.items() if m is None]:
        raise RuntimeError(f"llama-perplexity printed no {', '.join(missing)}; see {log}")
    scores = {k: float(m.group(1)) for k, m in found.items()}
    passkey, meta = kv.passkey_inputs(model)
    _, prompt_ids = kv.generation_prompt(model)
    partial = OUT / f".{peer}_{model}.llamacpp.json"
    partial.unlink(missing_ok=True)
    wlog = LOGS / f"kv_{peer}_{model}.log"
    wall, cpu, rss, code = run_measured([sys.executable, str(WORKER), "--worker", "--mode",
                                         "llamacpp", "--gguf", str(gguf), "--cache-type", kind, "--passkey",
                                         str(passkey), "--prompt-ids", str(prompt_ids), "--new", str(kv.GEN_NEW),
                                         "--threads", str(a.threads), "--out", str(partial)],
                                        {**os.environ, "OMP_NUM_THREADS": str(a.threads)}, wlog)
    if code != 0 or not partial.exists():
        raise RuntimeError(f"llama.cpp worker exited {code}; see {wlog}")
    worker = json.loads(partial.read_text())
    partial.unlink()
    gen = worker["generation"]
    gen.update(text=_decode(model, [gen.pop("tokens")])[0], peak_rss_mib=rss, worker_wall_seconds=wall,
               worker_cpu_seconds=cpu, bytes_per_token=GGML_BITS[kind] / 8 * kv.values_per_token(model))
    import llama_cpp

    return {"tool": "llama.cpp", "versions": {"llama-cpp-python": llama_cpp.__version__}, "cache_type": kind,
            "flash_attention": True, "gguf": str(gguf), "ppl": scores["ppl"], "float_ppl_llamacpp": scores["ppl_base"],
            "kld": scores["kld"], "kld_p99": scores["kld_p99"], "top1_changed": 1 - scores["same_top_pct"] / 100,
            "eval_seconds": None if reused else time.perf_counter() - start, "eval_log_reused": reused,
            "bits_per_value": GGML_BITS[kind],
            "bits_source": "ggml block size of the cache type", "log": str(log),
            "convention": "llama-perplexity: BOS per chunk, second half of each chunk scored; KLD vs the F32 cache",
            "passkey": kv.score_passkey(meta, _decode(model, worker["passkey_tokens"])), "generation": gen}


def _finished_log(log: Path, args: list[str]) -> str | None:
    """The output in `log` when it records llama-perplexity run with exactly `args` to its final scores."""
    import llamacpp_tools as llamacpp

    if not log.exists():
        return None
    first, _, out = log.read_text().partition("\n")
    ran = first.removeprefix("$ ").split(" ")[1:]
    done = all(re.search(p, out) for p in llamacpp.KLD_FIELDS.values())
    return out if ran == args and done else None


def f32_gguf(model: str) -> Path:
    """lowbit's F32 GGUF export of `model` (bench/gguf_vs_llamacpp.py's file when it exists)."""
    sys.path.insert(0, str(REPO))
    from lowbit.paths import cache_dir

    path = cache_dir() / "bench" / "gguf" / model / "F32.gguf"
    if not path.exists():
        from lowbit.export.gguf.writer import write_gguf
        from lowbit.models.load import load

        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(load(model), path)
    return path


def driver() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="lowbit model name (repeatable; default smollm2-135m)")
    p.add_argument("--peer", action="append", choices=PEERS, help="repeatable; default all")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    for model in a.model or ["smollm2-135m"]:
        for peer in a.peer or PEERS:
            row = {"peer": peer, "model": model, "eval": {"text": str(EVAL), "ctx": a.ctx, "windows": a.windows}}
            try:
                row.update(run_transformers(peer, model, a) if peer in TRANSFORMERS else run_llamacpp(peer, model, a))
            except Exception as e:      # a peer that cannot run is a row saying why, not a gap
                row["error"] = failure_reason(e)
                row["error_log_tail"] = str(e)
            (OUT / f"{peer}_{model}.json").write_text(json.dumps(row, indent=1, default=str))
            print(json.dumps({k: row.get(k) for k in ("peer", "model", "ppl", "kld", "bits_per_value", "error")
                              if k in row}), flush=True)


if __name__ == "__main__":
    driver()
