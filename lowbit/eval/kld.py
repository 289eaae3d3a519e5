"""KL divergence of a model's next-token distribution from a reference, streamed per window.

`token_kld` is the readable definition; `ReferenceWindow` + `token_scores` the fast path
evaluation uses (one reference pass per window shared by every model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def token_kld(logits_ref: Tensor, logits: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Per-token KL(P_ref || P) in nats and whether the top-1 token changed.

    logits_ref, logits: [T, V] for the same T positions. Returns (kld [T] float32,
    top1_changed [T] bool). Rows are processed in chunks so memory stays ~chunk × V.
    """
    kl, changed = [], []
    for start in range(0, logits.shape[0], chunk):
        lp_ref = torch.log_softmax(logits_ref[start:start + chunk].float(), dim=-1)
        lp = torch.log_softmax(logits[start:start + chunk].float(), dim=-1)
        kl.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0.0))
        changed.append(lp_ref.argmax(-1) != lp.argmax(-1))
    return torch.cat(kl), torch.cat(changed)


class ReferenceWindow:
    """One window's reference distribution, computed once and compared with every model.

    logits_ref: [T, V]. Keeps the logits, their log-normaliser (max + log_sum) [T], the
    probabilities P_ref [T, V] (float32; the one [T, V] copy this adds) and the top-1 [T].
    """

    def __init__(self, logits_ref: Tensor, chunk: int = 256):
        self.logits, self.chunk = logits_ref, chunk
        self.max = torch.empty(logits_ref.shape[0])
        self.log_sum = torch.empty(logits_ref.shape[0], dtype=torch.float64)
        self.probs = torch.empty(logits_ref.shape, dtype=torch.float32)
        work = None
        for rows in _chunks(logits_ref.shape[0], chunk):
            self.max[rows], self.log_sum[rows], work = _log_normaliser(logits_ref[rows].float(), work)
            lse = (self.max[rows].double() + self.log_sum[rows]).float()
            torch.sub(logits_ref[rows].float(), lse[:, None], out=self.probs[rows]).exp_()
        self.top1 = logits_ref.argmax(-1)


def _chunks(T: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, T)) for start in range(0, T, chunk)]


def _log_normaliser(z: Tensor, work: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """logsumexp of [n, V] rows as (max [n] float32, log Σ exp(z - max) [n] float64), kept
    apart because their float32 sum (~15 for a 262k vocabulary) would round KL to ~1e-6.
    `work` is a reused [chunk, V] buffer (fresh [T, V] temporaries cost more than the math)."""
    if work is None or work.shape[1] != z.shape[1] or work.shape[0] < z.shape[0]:
        work = torch.empty_like(z)
    m = z.amax(dim=-1)
    e = torch.sub(z, m[:, None], out=work[: z.shape[0]]).exp_()
    return m, e.sum(-1).double().log(), work


def token_scores(logits: Tensor, targets: Tensor, ref: ReferenceWindow | None = None
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-token NLL of `targets` and, against `ref`, KL(P_ref || P) and top-1 changes.

    logits: [T, V], targets: [T]. The fast path of cross_entropy + token_kld (tested against
    them): with lse = logsumexp(z), NLL = lse - z[target] and KL = Σ P_ref (z_ref - z) +
    lse - lse_ref (the lse difference in float64), so each model costs one logsumexp, one
    difference and one dot per row instead of two log_softmax and an exp of [T, V].
    Returns (nll [T] float32, kld [T] float32 or None, top1_changed [T] bool or None).
    """
    T = logits.shape[0]
    nll = torch.empty(T)
    kl = torch.empty(T) if ref is not None else None
    work = None
    for rows in _chunks(T, ref.chunk if ref is not None else 256):
        z = logits[rows].float()
        m, log_sum, work = _log_normaliser(z, work)
        nll[rows] = (m.double() + log_sum - z.gather(1, targets[rows, None]).squeeze(1).double()).float()
        if ref is not None:
            diff = torch.sub(ref.logits[rows].float(), z, out=work[: z.shape[0]])  # [n, V]; small where P ≈ P_ref
            dot = torch.bmm(ref.probs[rows, None, :], diff[:, :, None]).reshape(-1)  # [n, 1, 1] -> [n]
            lse_diff = (m - ref.max[rows]).double() + log_sum - ref.log_sum[rows]
            kl[rows] = (dot.double() + lse_diff).clamp_min(0.0).float()
    changed = logits.argmax(-1) != ref.top1 if ref is not None else None
    return nll, kl, changed


@dataclass(frozen=True)
class KldResult:
    """KL(P_ref || P) over the evaluated predictions (natural log)."""

    mean: float
    p99: float
    top1_changed: float          # share of predictions whose argmax differs from the reference
    predictions: int
    reference: str

    @classmethod
    def from_tokens(cls, kld: Tensor, changed: Tensor, reference: str) -> "KldResult":
        return cls(mean=float(kld.double().mean()), p99=float(torch.quantile(kld.double(), 0.99)),
                   top1_changed=float(changed.double().mean()), predictions=int(kld.numel()),
                   reference=reference)
