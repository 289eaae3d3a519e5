"""Passkey retrieval (long-context check of a KV cache): a 5-digit number hidden at a given depth in
filler text taken from the evaluation text, then asked for; greedy generation must reproduce it.

Prompt (token counts exact): HEADER + filler[:a] + NEEDLE + filler[a:b] + QUESTION, with a = depth·(room)
and room = length − header − needle − question tokens, so the whole prompt is `length` tokens. The filler is consecutive text
from a seeded offset of the evaluation text, different per trial.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

HEADER = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about it.\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str

    @property
    def correct(self) -> bool:
        return re.search(r"\d+", self.answer) is not None and re.search(r"\d+", self.answer).group() == self.key


def passkey_prompt(tokenizer, filler_ids: Tensor, length: int, depth: float, key: str, offset: int) -> Tensor:
    """[1, length] token ids: filler from `offset` with the needle at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False, return_tensors="pt").input_ids[0]
    question = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt").input_ids[0]
    header = tokenizer(HEADER, return_tensors="pt").input_ids[0]          # with the model's BOS, if it adds one
    room = length - header.numel() - needle.numel() - question.numel()
    if room < 1:
        raise ValueError(f"a prompt of {length} tokens has no room for filler")
    if offset + room > filler_ids.numel():
        raise ValueError(f"the filler text has {filler_ids.numel()} tokens, {offset + room} needed")
    filler = filler_ids[offset:offset + room]
    a = int(round(depth * room))
    return torch.cat([header, filler[:a], needle, filler[a:], question])[None]


@dataclass(frozen=True)
class PasskeyPrompt:
    length: int
    depth: float
    key: str
    ids: Tensor                  # [1, length]


def passkey_prompts(tokenizer, filler_ids: Tensor, lengths: list[int], depths: list[float], trials: int = 1,
                    seed: int = 0) -> list[PasskeyPrompt]:
    """Every (length, depth) `trials` times: a seeded key and filler offset each."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randrange(10000, 100000))
                offset = rng.randrange(0, max(1, filler_ids.numel() - length))
                out.append(PasskeyPrompt(length, depth, key,
                                         passkey_prompt(tokenizer, filler_ids, length, depth, key, offset)))
    return out


def run_passkey(model, tokenizer, filler_ids: Tensor, lengths: list[int], depths: list[float], make_cache,
                trials: int = 1, seed: int = 0, progress=None) -> list[PasskeyTrial]:
    """passkey_prompts, each answered greedily (8 new tokens) with a fresh cache from make_cache()."""
    from ..kv.generate import generate_greedy

    out = []
    for prompt in passkey_prompts(tokenizer, filler_ids, lengths, depths, trials, seed):
        gen = generate_greedy(model, prompt.ids, 8, make_cache())
        out.append(PasskeyTrial(prompt.length, prompt.depth, prompt.key,
                                tokenizer.decode(gen.tokens, skip_special_tokens=True)))
        if progress is not None:
            progress(out[-1])
    return out


def accuracy_by_depth(trials: list[PasskeyTrial]) -> dict[float, float]:
    by: dict[float, list[bool]] = {}
    for t in trials:
        by.setdefault(t.depth, []).append(t.correct)
    return {d: sum(v) / len(v) for d, v in sorted(by.items())}
