"""The inputs every KV-cache row gets (bench/kv_cache.py and bench/peers/kv_peers.py): passkey prompts and
the long generation prompt, built once per model with lowbit's tokenizer from the evaluation text and
kept as files, so lowbit's rows and the peers' read the same tokens.

  passkey     PASSKEY_LENGTHS × PASSKEY_DEPTHS, one trial each (seed 0): prompts.safetensors ("ids_<i>")
              and prompts.json (length, depth, key per i)
  generation  a prompt of GEN_CONTEXT − GEN_NEW tokens of the evaluation text (from its start), then
              GEN_NEW greedy tokens: 8k tokens of context. prompt.txt (what `lowbit generate
              --prompt-file` reads) and prompt.safetensors (its tokens, "input_ids", as lowbit tokenizes it)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "test.txt"
PASSKEY_LENGTHS = (1024, 2048, 4096, 8184)   # + 8 new tokens: SmolLM2's 8192 positions
PASSKEY_DEPTHS = (0.25, 0.75)
GEN_CONTEXT, GEN_NEW = 8192, 64


def work_dir(model: str) -> Path:
    sys.path.insert(0, str(REPO))
    from lowbit.paths import cache_dir

    return cache_dir() / "bench" / "kv" / model


def _tokenizer_and_ids(model: str):
    sys.path.insert(0, str(REPO))
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import tokenize
    from lowbit.models.load import load

    tokenizer = load(model).tokenizer
    return tokenizer, tokenize(tokenizer, read_text(EVAL_TEXT).text)


def passkey_inputs(model: str) -> tuple[Path, list[dict]]:
    """(prompts.safetensors, [{length, depth, key}]) for `model`, written on first use."""
    from safetensors.torch import save_file

    root = work_dir(model) / "passkey"
    files, meta = root / "prompts.safetensors", root / "prompts.json"
    if not (files.exists() and meta.exists()):
        from lowbit.eval.passkey import passkey_prompts

        tokenizer, ids = _tokenizer_and_ids(model)
        prompts = passkey_prompts(tokenizer, ids, list(PASSKEY_LENGTHS), list(PASSKEY_DEPTHS))
        root.mkdir(parents=True, exist_ok=True)
        save_file({f"ids_{i}": p.ids.contiguous() for i, p in enumerate(prompts)}, str(files))
        meta.write_text(json.dumps([{"length": p.length, "depth": p.depth, "key": p.key} for p in prompts], indent=1))
    return files, json.loads(meta.read_text())


def generation_prompt(model: str) -> tuple[Path, Path]:
    """(prompt.txt, prompt.safetensors): GEN_CONTEXT − GEN_NEW tokens of the evaluation text, written on first use."""
    from safetensors.torch import save_file

    root = work_dir(model) / "generation"
    text_file, ids_file = root / "prompt.txt", root / "prompt.safetensors"
    if not (text_file.exists() and ids_file.exists()):
        tokenizer, ids = _tokenizer_and_ids(model)
        n = GEN_CONTEXT - GEN_NEW
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        prompt = tokenizer(text, return_tensors="pt").input_ids            # as `lowbit generate` tokenizes it
        while prompt.shape[1] > n:                                           # a decode/encode round trip can grow
            text = text[: int(len(text) * 0.99)]
            prompt = tokenizer(text, return_tensors="pt").input_ids
        root.mkdir(parents=True, exist_ok=True)
        text_file.write_text(text, encoding="utf-8")
        save_file({"input_ids": prompt.contiguous()}, str(ids_file))
    return text_file, ids_file


def score_passkey(meta: list[dict], answers: list[str]) -> dict:
    """Accuracy overall, per depth and per length, and each trial, from the decoded answers."""
    from lowbit.eval.passkey import PasskeyTrial

    trials = [PasskeyTrial(m["length"], m["depth"], m["key"], a) for m, a in zip(meta, answers, strict=True)]
    by = lambda attr: {str(v): sum(t.correct for t in trials if getattr(t, attr) == v) /
                       sum(1 for t in trials if getattr(t, attr) == v)
                       for v in sorted({getattr(t, attr) for t in trials})}
    return {"accuracy": sum(t.correct for t in trials) / len(trials), "by_depth": by("depth"), "by_length": by("length"),
            "trials": [{"length": t.length, "depth": t.depth, "key": t.key, "answer": t.answer, "correct": t.correct}
                       for t in trials]}


def values_per_token(model: str) -> int:
    """K and V values one token adds to a full cache: 2 × layers × KV heads × head_dim."""
    sys.path.insert(0, str(REPO))
    from lowbit.models.load import load

    config = load(model).model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
