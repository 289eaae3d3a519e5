"""`lowbit generate`: greedy text from a prompt, with the float or a quantized KV cache; tokens/s and
the cache's bytes per token."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LowbitError
from .kv_args import add_kv_args, key_scales, kv_config
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation with a float or quantized KV cache",
                       description="Greedy generation from a prompt. With --kv the cache stores K and V packed "
                                   "and de-quantizes them on every read; prints the text, tokens/s and the "
                                   "cache's bytes per token.")
    p.add_argument("model", help="a lowbit directory, a model name, a .gguf file or an HF directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="a UTF-8 file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    add_kv_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from transformers import DynamicCache

    from ..kv.cache import QuantizedKVCache
    from ..kv.generate import generate_greedy
    from ..kv.rope import layer_ropes
    from ..models.load import load

    if args.max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise LowbitError(f"--prompt-file {path}: no such file")
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    if not prompt:
        raise LowbitError("the prompt is empty")
    kv = kv_config(args)
    from ..eval import rss

    # from before the load (whose freed buffers would otherwise shape the heap): the prefill's large one-off
    # temporaries go back to the system at once; the decode steps' same-sized ones are reused from the heap
    # (an mmap for each slowed decoding in development)
    pinned = rss.pin_mmap_threshold(rss.PREFILL_MMAP_THRESHOLD)
    loaded = load(args.model)
    model = loaded.model
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise LowbitError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} exceed the "
                          f"model's context ({limit})")
    if kv is not None:
        try:
            kv.check_context(ids.shape[1] + args.max_new_tokens)
        except ValueError as e:
            raise LowbitError(str(e)) from None
        if any(getattr(m, "lowbit_kv", None) is not None for m in model.modules()):
            raise LowbitError("this model already quantizes its KV cache (its recipe's kv_cache): --kv cannot be added")
        try:
            ropes = layer_ropes(model, loaded.spec) if kv.pre_rope else None
        except ValueError as e:
            raise LowbitError(f"--kv-pre-rope on {loaded.spec.family}: {e}") from None
        cache = QuantizedKVCache.for_model(kv, model.config, key_scales(args, loaded, kv), ropes)
    else:
        cache = DynamicCache(config=model.config)
    eos = loaded.tokenizer.eos_token_id
    loaded_mib = rss.current_mib()
    measured = rss.reset_peak()                   # the peak of the generation alone, not of the load
    result = generate_greedy(model, ids, args.max_new_tokens, cache, {eos} if isinstance(eos, int) else None,
                             after_prefill=lambda: rss.pin_mmap_threshold(rss.DECODE_MMAP_THRESHOLD))
    text = loaded.tokenizer.decode(result.tokens, skip_special_tokens=True)
    print(text)
    print()
    name = kv.name if kv is not None else f"float ({next(model.parameters()).dtype})"
    print(table(["cache", "prompt tokens", "new tokens", "prefill s", "decode tokens/s", "cache bytes/token"],
                [[name, result.prompt_tokens, result.tokens.numel(), result.prefill_seconds,
                  result.decode_tokens_per_second, result.bytes_per_token]]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": args.model, "kv_cache": kv.to_dict() if kv else None, "text": text,
            "tokens": result.tokens.tolist(), "prompt_tokens": result.prompt_tokens,
            "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
            "decode_tokens_per_second": result.decode_tokens_per_second,
            "cache_bytes": result.cache_bytes, "cache_bytes_per_token": result.bytes_per_token,
            "rss_after_load_mib": loaded_mib, "generation_peak_rss_mib": rss.peak_mib() if measured else None,
            "mmap_threshold_pinned": pinned},
            indent=1))
    return 0
