"""KL divergence of a model's next-token distribution from a reference, streamed per window."""
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
