"""Greedy generation with a given cache, timed: prefill and decode apart, the cache's bytes per token."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Generation:
    tokens: Tensor               # [new] generated token ids
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int             # what the cache holds at the end
    context: int                 # prompt + generated tokens the cache covers

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.tokens.numel() - 1, 0)            # the first new token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.cache_bytes / self.context if self.context else 0.0


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: the packed cache says; a float cache is its tensors."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def generate_greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, cache, eos: set[int] | None = None,
                    progress=None, after_prefill=None) -> Generation:
    """ids [1, T] prompt; greedy next tokens until max_new_tokens or an eos id; `cache` is filled in place;
    after_prefill() is called between the prompt's forward and the first decode step."""
    start = time.perf_counter()
    # only the last position's logits: the whole prompt's would be [T, vocab] (1.6 GB at 8k for a 49k vocabulary)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[0, -1].argmax()
    prefill = time.perf_counter() - start
    if after_prefill is not None:
        after_prefill()
    new = [int(token)]
    start = time.perf_counter()
    while len(new) < max_new_tokens and not (eos and new[-1] in eos):
        out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
        token = out.logits[0, -1].argmax()
        new.append(int(token))
        if progress is not None:
            progress(len(new))
    decode = time.perf_counter() - start
    return Generation(torch.tensor(new), ids.shape[1], prefill, decode, cache_nbytes(cache),
                      ids.shape[1] + len(new) - 1)
