"""The worker side of kv_peers.py, run inside a peer's environment (transformers' QuantizedCache) or
lowbit's (llama.cpp through llama-cpp-python). It imports lowbit's evaluation and generation code
only (lowbit.eval.perplexity, lowbit.kv.generate: torch and transformers, nothing else of lowbit)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]


def _rss(key: str):
    """VmRSS / VmHWM of this process in MiB (lowbit.eval.rss, without importing lowbit here)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")             # the peak from here on: the generation's, not the load's


def stored_bytes(obj) -> int:
    """Bytes of every tensor inside `obj`: plain tensors, tensor subclasses that flatten into inner
    tensors (quanto's packed QBitsTensor), and the tuples / dicts HQQ returns (codes, scale, zero)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and type(obj).__name__ != "Parameter":
            names, _ = obj.__tensor_flatten__()
            return sum(stored_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(stored_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(stored_bytes(o) for o in obj.values())
    return 0


def cache_bytes(cache) -> int:
    """What a transformers QuantizedCache holds: the quantized store and the float residual, every layer."""
    return sum(stored_bytes([getattr(layer, n, None) for n in ("_quantized_keys", "_quantized_values", "keys", "values")])
               for layer in cache.layers)


class Chunked:
    """A model whose forward feeds the window `chunk` tokens at a time through one fresh cache (see kv_peers)."""

    def __init__(self, model, make_cache, chunk: int):
        self.model, self.make_cache, self.chunk, self.config = model, make_cache, chunk, model.config

    def __call__(self, input_ids, **_):
        cache, logits = self.make_cache(), []
        for start in range(0, input_ids.shape[1], self.chunk):
            out = self.model(input_ids=input_ids[:, start:start + self.chunk], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        return SimpleNamespace(logits=__import__("torch").cat(logits, 1))


def transformers_worker(a) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file

    sys.path.append(str(REPO))
    from lowbit.kv.generate import generate_greedy

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32).eval()
    settings = dict(nbits=a.bits, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)
    make_cache = lambda: transformers.QuantizedCache(backend=a.backend, config=model.config, **settings)
    base = {"backend": a.backend, "settings": settings, "versions": {"torch": torch.__version__,
                                                                     "transformers": transformers.__version__}}
    for package in ("optimum.quanto", "hqq"):
        try:
            base["versions"][package] = __import__(package, fromlist=["__version__"]).__version__
        except (ImportError, AttributeError):
            pass
    if a.mode == "generate":
        ids = load_file(a.prompt_ids)["input_ids"]
        cache = make_cache()
        loaded_mib = _rss("VmRSS")
        _reset_peak()
        gen = generate_greedy(model, ids, a.new, cache)
        return {**base, "rss_after_load_mib": loaded_mib, "generation_peak_rss_mib": _rss("VmHWM"),
                "tokens": gen.tokens.tolist(), "prompt_tokens": gen.prompt_tokens,
                "prefill_seconds": gen.prefill_seconds, "decode_seconds": gen.decode_seconds,
                "decode_tokens_per_second": gen.decode_tokens_per_second, "cache_bytes": cache_bytes(cache),
                "context": gen.context, "bytes_per_token": cache_bytes(cache) / gen.context}
    from lowbit.eval.perplexity import evaluate_many

    ids = load_file(a.eval_ids)["input_ids"]
    with torch.inference_mode():
        res = evaluate_many({"peer": Chunked(model, make_cache, a.chunk)}, ids, a.ctx, a.windows, reference=model,
                            reference_name="float model, no cache quantization")["peer"]
    prompts = load_file(a.passkey)
    answers = []
    for i in range(len(prompts)):
        answers.append(generate_greedy(model, prompts[f"ids_{i}"], 8, make_cache()).tokens.tolist())
    return {**base, "ppl": res.ppl, "kld": res.kld.mean, "kld_p99": res.kld.p99, "top1_changed": res.kld.top1_changed,
            "eval_windows": res.windows, "eval_seconds": res.seconds, "chunk": a.chunk,
            "convention": res.convention, "passkey_tokens": answers}


def _greedy(llm, ids: list[int], new: int) -> tuple[list[int], float, float]:
    """llama.cpp greedy tokens after `ids` (a fresh context): (tokens, prefill s, decode s)."""
    import numpy as np

    llm.reset()
    logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))   # the last token's row
    start = time.perf_counter()
    llm.eval(ids)
    out = [int(logits().argmax())]
    prefill, start = time.perf_counter() - start, time.perf_counter()
    while len(out) < new:
        llm.eval([out[-1]])
        out.append(int(logits().argmax()))
    return out, prefill, time.perf_counter() - start


def llamacpp_worker(a) -> dict:
    import llama_cpp
    from safetensors.torch import load_file

    sys.path.append(str(REPO / "bench" / "peers"))
    from kv_peers import GGML_BITS

    kind = getattr(llama_cpp, f"GGML_TYPE_{a.cache_type.upper()}")
    prompt = load_file(a.prompt_ids)["input_ids"][0].tolist()
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=len(prompt) + a.new, n_batch=512, n_threads=a.threads,
                          flash_attn=True, type_k=kind, type_v=kind, verbose=False)
    prompts = load_file(a.passkey)
    answers = [_greedy(llm, prompts[f"ids_{i}"][0].tolist(), 8)[0] for i in range(len(prompts))]
    loaded_mib = _rss("VmRSS")
    _reset_peak()
    tokens, prefill, decode = _greedy(llm, prompt, a.new)
    layers = llm.metadata.get(f"{llm.metadata['general.architecture']}.block_count")
    return {"passkey_tokens": answers, "generation": {
        "tokens": tokens, "rss_after_load_mib": loaded_mib, "generation_peak_rss_mib": _rss("VmHWM"),
        "prompt_tokens": len(prompt), "prefill_seconds": prefill, "decode_seconds": decode,
        "decode_tokens_per_second": (len(tokens) - 1) / decode, "context": len(prompt) + len(tokens) - 1,
        "layers": int(layers) if layers else None, "bits_per_value": GGML_BITS[a.cache_type],
        "note": "llama.cpp allocates the cache for n_ctx up front; bytes per token follow from the type's block size"}}


def worker() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", choices=("eval", "generate", "llamacpp"), required=True)
    for flag in ("--peer", "--float-dir", "--backend", "--eval-ids", "--passkey", "--prompt-ids", "--gguf",
                 "--cache-type"):
        p.add_argument(flag)
    for flag, default in (("--bits", 4), ("--chunk", 64), ("--ctx", 2048), ("--windows", 20), ("--new", 64), ("--threads", 2)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    row = llamacpp_worker(a) if a.mode == "llamacpp" else transformers_worker(a)
    Path(a.out).write_text(json.dumps(row, indent=1, default=str))


if __name__ == "__main__":
    worker()
