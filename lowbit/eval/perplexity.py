"""Perplexity (and, against a reference model, KL divergence) in one stated convention."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import LowbitError
from .kld import KldResult, ReferenceWindow, token_scores

CONVENTION = (
    "GPTQ convention: the whole text tokenized once with the tokenizer's defaults (a BOS token "
    "only at the very start, and only if the tokenizer adds one); non-overlapping windows of ctx "
    "tokens, the last partial window dropped; each window's loss is the mean NLL of its ctx-1 "
    "next-token predictions; ppl = exp(mean of window losses); KLD = mean over the same "
    "predictions of KL(P_ref || P) in nats."
)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float                       # mean of window losses (nats)
    tokens: int                      # tokens in the whole text
    ctx: int
    windows: int                     # windows evaluated
    window_nll: tuple[float, ...]
    kld: KldResult | None
    seconds: float
    convention: str = CONVENTION


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one [T] int64 tensor, with the tokenizer's default special tokens."""
    return torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def make_windows(ids: torch.Tensor, ctx: int, windows: int | None) -> torch.Tensor:
    """[n, ctx] non-overlapping windows from [T] ids; the last partial window is dropped."""
    available = ids.numel() // ctx
    if available == 0:
        raise LowbitError(f"the text has {ids.numel()} tokens, fewer than one window of --ctx {ctx}")
    n = available if windows is None else windows
    if n < 1 or n > available:
        raise LowbitError(f"--windows {windows}: the text has {available} windows of {ctx} tokens")
    return ids[: n * ctx].reshape(n, ctx)         # row i = tokens [i*ctx, (i+1)*ctx)


def check_ctx(model, ctx: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if ctx < 2:
        raise LowbitError(f"--ctx {ctx} must be at least 2")
    if limit is not None and ctx > limit:
        raise LowbitError(f"--ctx {ctx} is larger than the model's context ({limit} positions)")


def _logits(model, window: torch.Tensor) -> torch.Tensor:
    """[ctx-1, V] logits predicting tokens 1..ctx-1 of one [ctx] window."""
    # use_cache=True (a fresh cache per call, discarded): same logits, and with use_cache=False a
    # 2048-token forward was 12% slower for SmolLM2 (7.3 vs 6.5 s) and 19% for Gemma 3 here
    out = model(input_ids=window[None], use_cache=True)
    return out.logits[0, :-1]


# A window's [ctx-1, V] float32 logits above this many bytes are not made whole: Gemma 3's
# 262k vocabulary at ctx 8192 is 8.6 GB per copy, and scoring holds three (reference logits,
# its probabilities, a model's logits). The model then returns its final hidden states and the
# head runs over BLOCK positions at a time. Below it the plain path, which earlier results used.
LOGITS_BUDGET = 4 << 30
BLOCK = 1024


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits [..., V] from its decoder's final hidden states [..., d]: the output embedding,
    then the config's final logit soft-capping where it has one (Gemma 2/3)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class SplitHead:
    """One window's final hidden states [ctx, d] and the model's head, applied in row blocks.

    The head is the output embedding plus the config's final logit soft-capping (Gemma 2/3),
    and it is checked against the model's own logits for the window's last position, so a
    head this misses (another post-processing of the logits) fails loudly, not silently.
    """

    def __init__(self, model, window: torch.Tensor):
        decoder, self.model = model.get_decoder(), model
        captured = []
        hook = decoder.register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:   # logits_to_keep=1: the model's own head runs on the last position only
            out = model(input_ids=window[None], use_cache=True, logits_to_keep=1)
        finally:
            hook.remove()
        self.hidden = captured[-1][0]                      # [1, ctx, d] -> [ctx, d]
        own, mine = out.logits[0, -1].float(), self(slice(-1, None))[0].float()
        if not torch.allclose(mine, own, rtol=1e-4, atol=1e-4 * float(own.abs().max())):
            raise LowbitError(f"{type(model).__name__}: its logits are not output embedding + soft-capping of "
                              f"its final hidden states, so a {window.numel()}-token window cannot be scored "
                              f"in blocks; use a smaller --ctx")

    def __call__(self, rows: slice) -> torch.Tensor:
        """[n, V] logits of the hidden rows `rows`."""
        return head_logits(self.model, self.hidden[rows])


def _splits(models: dict, reference, ctx: int) -> bool:
    vocab = max(m.config.vocab_size for m in (*models.values(), *([reference] if reference is not None else [])))
    return (ctx - 1) * vocab * 4 > LOGITS_BUDGET


@torch.inference_mode()
def evaluate_many(models: dict, ids: torch.Tensor, ctx: int, windows: int | None = None,
                  reference=None, reference_name: str = "", progress: bool = True) -> dict:
    """Perplexity of each model in `models` on the same windows; with `reference`, KL(P_ref || P).

    The reference runs once per window and is compared with every model, so evaluating K
    models costs K + 1 forward passes per window, and no logits are kept between windows.
    Windows whose logits exceed LOGITS_BUDGET are scored in blocks of positions (SplitHead).
    Returns {name: PerplexityResult}.
    """
    for model in models.values():
        check_ctx(model, ctx)
    rows = make_windows(ids, ctx, windows)
    split = _splits(models, reference, ctx)
    start = time.perf_counter()
    losses = {name: [] for name in models}
    kls = {name: [] for name in models}
    changes = {name: [] for name in models}
    for index, window in enumerate(tqdm(rows, desc="eval", unit="window", disable=not progress, leave=False)):
        targets, scores = window[1:], {name: [] for name in models}
        if split:   # every model's hidden states first (small), then the logits block by block
            heads = {name: SplitHead(m, window) for name, m in models.items() if m is not reference}
            ref_head = SplitHead(reference, window) if reference is not None else None
            blocks = [slice(s, min(s + BLOCK, ctx - 1)) for s in range(0, ctx - 1, BLOCK)]
        else:
            blocks = [slice(0, ctx - 1)]
        for block in blocks:
            ref_logits = None
            if reference is not None:
                ref_logits = ref_head(block) if split else _logits(reference, window)
            ref = ReferenceWindow(ref_logits) if ref_logits is not None else None
            for name, model in models.items():
                if model is reference:
                    logits = ref_logits
                else:
                    logits = heads[name](block) if split else _logits(model, window)
                scores[name].append(token_scores(logits, targets[block], ref))
                del logits
            del ref, ref_logits
        for name in models:
            nll = torch.cat([s[0] for s in scores[name]])
            loss = nll.double().mean().item()
            if not math.isfinite(loss):
                raise LowbitError(f"{name}: window {index} has a non-finite loss (NaN/Inf in the model)")
            losses[name].append(loss)
            if reference is not None:
                kls[name].append(torch.cat([s[1] for s in scores[name]]))
                changes[name].append(torch.cat([s[2] for s in scores[name]]))
    seconds = time.perf_counter() - start
    results = {}
    for name, window_nll in losses.items():
        nll = sum(window_nll) / len(window_nll)
        kld = (KldResult.from_tokens(torch.cat(kls[name]), torch.cat(changes[name]), reference_name)
               if kls[name] else None)
        results[name] = PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=int(ids.numel()), ctx=ctx,
                                         windows=len(window_nll), window_nll=tuple(window_nll), kld=kld,
                                         seconds=seconds)
    return results


def evaluate(model, ids: torch.Tensor, ctx: int, windows: int | None = None,
             reference=None, reference_name: str = "", progress: bool = True) -> PerplexityResult:
    """Perplexity of one model by CONVENTION; with `reference`, also KL(P_ref || P)."""
    return evaluate_many({"model": model}, ids, ctx, windows, reference, reference_name, progress)["model"]
