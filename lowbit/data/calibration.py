"""Calibration samples: N windows of L tokens drawn from a text with a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .text import EVAL_TEXTS, Text


@dataclass(frozen=True)
class CalibConfig:
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    allow_eval_text: bool = False

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError(f"calibration needs samples >= 1 and seq_len >= 2, got {self.samples} x {self.seq_len}")


def sample_calibration(ids: torch.Tensor, text: Text, config: CalibConfig) -> torch.Tensor:
    """Draw [samples, seq_len] token windows from the token ids of `text`.

    ids: [T] int64, the whole text tokenized once. Start offsets are uniform over
    [0, T - seq_len], drawn from a private torch.Generator seeded with `config.seed`, so the
    global RNG is untouched and the same seed gives the same samples.
    """
    if text.is_eval_text and not config.allow_eval_text:
        raise LowbitError(f"refusing to calibrate on the evaluation text ({EVAL_TEXTS[text.sha256]}, "
                          f"{text.origin}); pass --allow-eval-text to do it anyway")
    ids = ids.reshape(-1)                       # accept [1, T] from a tokenizer as well
    if ids.numel() < config.seq_len + 1:
        raise LowbitError(f"calibration text {text.origin} has {ids.numel()} tokens, fewer than "
                          f"--seq-len {config.seq_len} + 1")
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seq_len + 1, (config.samples,), generator=gen)
    # [samples, seq_len]: one row per window, gathered by broadcasting start + arange
    index = starts[:, None] + torch.arange(config.seq_len)[None, :]
    return ids[index]
