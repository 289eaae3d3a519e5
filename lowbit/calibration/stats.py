"""Streaming statistics of a linear's input, accumulated batch by batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

STATS = ("hessian", "absmax", "mean_abs", "sq_mean", "moments", "rows")
ROWS_PER_UPDATE = 32   # "rows": token rows kept per batch (128 samples -> 4096 rows)
GRAM_BLOCK = 192  # column block of gram(): 576 = 3 blocks, 1536 = 8 (SmolLM2's input widths)
WIDE = 4096       # wider inputs: H is summed block row by block row (InputStats._add_gram_by_rows)


def gram(x: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """xᵀx [in, in] of x [tokens, in], computing only the blocks on and above the diagonal.

    The product is symmetric, so block row i needs only x_iᵀ x[:, i:]; the blocks below the
    diagonal are copies. With k blocks that is (k + 1) / 2k of the full product's work.
    """
    n = x.shape[1]
    if n <= block:
        return x.T @ x
    h = torch.empty(n, n, dtype=x.dtype)
    for i in range(0, n, block):
        h[i:i + block, i:] = x[:, i:i + block].T @ x[:, i:]    # block row i, from the diagonal on
    for i in range(block, n, block):
        h[i:i + block, :i] = h[:i, i:i + block].T              # below the diagonal: the mirror
    return h


@dataclass
class InputStats:
    """Statistics of the inputs x [tokens, in] seen by one linear (or one group sharing an input).

    hessian:  H = Σ xᵀx over all tokens, [in, in] (float64), when requested; each batch's
              product is taken in float32 for float32/16 inputs (float64 matmuls are slower
              on CPU, and one batch's sums fit float32's precision), the running sum in float64
    absmax:   max |x_j| per input channel, [in]
    mean_abs: Σ |x_j| / tokens per channel, [in]   (AWQ's activation salience)
    sq_mean:  Σ x_j² / tokens per channel, [in]    (the imatrix)
    moments:  Σ x_j, Σ x_j², Σ x_j³, Σ x_j⁴ per channel, [4, in] (for kurtosis)
    rows:     a seeded random subset of the token rows, ROWS_PER_UPDATE per batch, [kept, in]
              float32 (what activation-aware searches quantize: SmoothQuant's α, percentiles)
    tokens:   how many token vectors were accumulated
    sink_weight: in H only, the first position of each sample (inputs [batch, seq, in]) counts
              this many times: the attention sink (see lowbit.quantize.SINK_WEIGHT)
    """

    in_features: int
    wanted: frozenset = field(default_factory=lambda: frozenset({"absmax", "mean_abs"}))
    sink_weight: float = 1.0
    tokens: int = 0
    hessian: Tensor | None = None
    absmax: Tensor | None = None
    abs_sum: Tensor | None = None
    sq_sum: Tensor | None = None
    power_sums: Tensor | None = None
    kept_rows: list = field(default_factory=list)

    def __post_init__(self):
        unknown = set(self.wanted) - set(STATS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)} (known: {', '.join(STATS)})")
        self.wanted = frozenset(self.wanted)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add a batch of inputs x [..., in] (any leading shape; [batch, seq, in] for the sink)."""
        x_in = x.detach()
        x = x_in.reshape(-1, self.in_features)             # [..., in] -> [tokens, in]
        n = x.shape[0]
        if "hessian" in self.wanted:
            xf = x if x.dtype == torch.float64 else x.float()   # float64 inputs stay float64
            x0 = None
            if self.sink_weight != 1.0 and x_in.dim() >= 3:
                x0 = xf.view(*x_in.shape)[..., 0, :].reshape(-1, self.in_features)   # [batch.., in]: position 0
            if self.in_features > WIDE and xf.dtype == torch.float32:
                self._add_gram_by_rows(xf, x0)
            else:
                self._add_gram(xf, x0)
        elif "absmax" not in self.wanted and not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values (NaN/Inf) in the captured activations")
        if "absmax" in self.wanted:
            m = x.abs().amax(0).float()
            if "hessian" not in self.wanted and not torch.isfinite(m).all():   # NaN/Inf reach the max
                raise FloatingPointError("non-finite values (NaN/Inf) in the captured activations")
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if "mean_abs" in self.wanted:
            s = x.abs().double().sum(0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        if "sq_mean" in self.wanted:
            s = x.double().pow(2).sum(0)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
        if "moments" in self.wanted:
            xd = x.double()
            p = torch.stack([xd.sum(0), xd.pow(2).sum(0), xd.pow(3).sum(0), xd.pow(4).sum(0)])
            self.power_sums = p if self.power_sums is None else self.power_sums.add_(p)
        if "rows" in self.wanted:
            g = torch.Generator().manual_seed(len(self.kept_rows) * 7919 + self.tokens)
            pick = torch.randperm(n, generator=g)[:ROWS_PER_UPDATE].sort().values
            self.kept_rows.append(x[pick].float().clone())
        self.tokens += n

    def _add_gram(self, xf: Tensor, x0: Tensor | None) -> None:
        """H += xᵀx (+ (sink_weight - 1) x0ᵀx0), the batch's product whole in xf's dtype."""
        h = gram(xf)                                       # [in, in]
        # diag(h) = Σ x_j²: a NaN/Inf anywhere in x shows there, at 1/tokens of the cost of x
        if not torch.isfinite(h.diagonal()).all():
            raise FloatingPointError("non-finite values (NaN/Inf) in the captured activations")
        if x0 is not None:
            h.add_(x0.T @ x0, alpha=self.sink_weight - 1.0)
        if self.hessian is None:
            self.hessian = h.double()
        else:
            self.hessian.add_(h)                           # float64 += float32, no float64 temporary

    def _add_gram_by_rows(self, xf: Tensor, x0: Tensor | None, block: int = GRAM_BLOCK) -> None:
        """_add_gram for wide inputs, one block row of the float32 product at a time: a [block, in]
        temporary instead of an [in, in] one (0.45 GiB at a 7B model's 11008 inputs). The same
        products as gram's added to the same sums, so H is the same to the bit (x0 is one row per
        sample, so its block products are single multiplications either way)."""
        n = self.in_features
        if self.hessian is None:
            self.hessian = torch.zeros(n, n, dtype=torch.float64)
        H = self.hessian
        for i in range(0, n, block):
            hb = xf[:, i:i + block].T @ xf[:, i:]          # [b, n - i]: block row i from the diagonal on
            if not torch.isfinite(hb[:, :block].diagonal()).all():
                raise FloatingPointError("non-finite values (NaN/Inf) in the captured activations")
            if x0 is not None:
                hb.add_(x0[:, i:i + block].T @ x0[:, i:], alpha=self.sink_weight - 1.0)
            H[i:i + block, i:].add_(hb)
        for i in range(block, n, block):
            H[i:i + block, :i] = H[:i, i:i + block].T      # below the diagonal: the mirror (H stays symmetric)

    @property
    def rows(self) -> Tensor:
        """The kept token rows [kept, in] float32."""
        return torch.cat(self.kept_rows) if self.kept_rows else torch.empty(0, self.in_features)

    @property
    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def sq_mean(self) -> Tensor:
        return (self.sq_sum / max(self.tokens, 1)).float()

    @property
    def kurtosis(self) -> Tensor:
        """Per-channel excess-free kurtosis E[(x-μ)⁴]/σ⁴ (3 for a Gaussian), [in]."""
        n = max(self.tokens, 1)
        s1, s2, s3, s4 = (self.power_sums / n)
        var = (s2 - s1 ** 2).clamp_min(1e-30)
        m4 = s4 - 4 * s1 * s3 + 6 * s1 ** 2 * s2 - 3 * s1 ** 4
        return (m4 / var ** 2).float()
