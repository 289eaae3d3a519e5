"""The model side of `lowbit plan --refine`: every (tensor, option) rounded once, a model assembled from
any choice of them, and its KL divergence against the float model measured — the loss plans/search.py's
evolution minimises, starting from the knapsack's plan.

What the roundings are fitted on decides whether the search's gains survive `lowbit quantize --plan …
--method gptq`. Its walker fits each linear on the inputs the already-quantized layers before it give,
and that compensation is large at 2 bits: on SmolLM2 at 2.5 bits a model assembled from tensors each
GPTQ-rounded alone on float inputs lost about a third more than the stored model of the same plan, and a
search on it found plans better there that stored no better (a one-off check of 2026-12-07, outside
bench/). So the library is walked: `lowbit quantize`'s own walk of the starting plan, each
linear's options rounded on the Hessian that walk summed for it (with the sinks, as it counts them). The
starting plan assembled from it is the stored model; a trade away from it changes the inputs of the layers
after it, which the library keeps from the start — the approximation the search makes.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..eval.perplexity import head_logits
from ..formats import Format
from ..plans.planner import BitPlan, PlannerConfig, option_name, plan_items, plan_of, tensor_options
from ..plans.search import SearchConfig, SearchResult, evolve


@torch.no_grad()
def walked_hessians(loaded, plan: BitPlan, samples: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear: H [in, in] float64}: each planned linear's input Hessian as `lowbit quantize --plan … --method
    gptq` (its defaults) sums it on `samples` [N, L], walking a copy of the model (`loaded` is untouched)."""
    from ..quantize import QuantizeConfig, quantize
    from ..quantize_config import QUANTIZE_GPTQ

    H = {}
    twin = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    quantize(twin, QuantizeConfig(plan=plan.format_plan(), method="gptq", gptq=QUANTIZE_GPTQ), samples=samples,
             progress=progress, on_hessian=lambda name, h: H.__setitem__(name, h.detach().clone()))
    del twin
    return H


@torch.no_grad()
def round_all(model, names: list[str], fmts: list[Format], shares: tuple[float, ...], beside,
              hessians: dict[str, torch.Tensor], progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{tensor: {option: W_dq [out, in] float16}}: every option of every named linear GPTQ-rounded (as
    `lowbit quantize` rounds) on its Hessian in `hessians` (walked_hessians), which this empties. Float16
    halves the memory (a rounded weight is a float16 scale times a small integer: at most 2^-11 of it is lost)."""
    from ..analysis.tensor_losses import rounded

    out = {}
    for name in tqdm(names, desc="plan: rounding every option", unit="tensor", disable=not progress):
        W = model.get_submodule(name).weight.data.float()
        H = hessians.pop(name)                                              # done with it after: free its memory
        out[name] = {option_name(f.name, share): rounded(W, f, share, H, "gptq").half()
                     for f, share in tensor_options(fmts, shares, tuple(W.shape), beside)}
    return out


class AssembledKLD:
    """KL(P_float || P_assembled) in nats per position, on `rows` [R, L] at `positions` sampled positions of
    each row (the decoder runs every position — the context is the row's — the vocabulary-sized head only
    the sampled ones: on Gemma 3 the head costs more than the decoder)."""

    @torch.no_grad()
    def __init__(self, model, rows: torch.Tensor, positions: int = 512, seed: int = 0):
        self.model, self.rows = model, rows
        L = rows.shape[1]
        gen = torch.Generator().manual_seed(seed)
        # positions 1 .. L-1 (position 0 predicts from the BOS alone); sorted for a contiguous gather
        self.at = torch.randperm(L - 1, generator=gen)[:min(positions, L - 1)].sort().values + 1
        self.ref = torch.cat([self._logp(r) for r in range(rows.shape[0])])   # [R·P, V]

    def _logp(self, r: int) -> torch.Tensor:
        h = self.model.get_decoder()(input_ids=self.rows[r:r + 1], use_cache=False).last_hidden_state  # [1, L, d]
        return F.log_softmax(head_logits(self.model, h[0, self.at]).float(), dim=-1)               # [P, V]

    @torch.no_grad()
    def __call__(self) -> float:
        """The KLD of the model as it stands now."""
        total, n = 0.0, 0
        for r in range(self.rows.shape[0]):
            lp = self._logp(r)
            ref = self.ref[n:n + lp.shape[0]]
            total += float((ref.exp() * (ref - lp)).sum())
            n += lp.shape[0]
        return total / n


class Assembly:
    """The model's named linears set to one option each from `library` (only the tensors that change)."""

    def __init__(self, model, library: dict[str, dict[str, torch.Tensor]]):
        self.model, self.library = model, library
        self.float = {n: model.get_submodule(n).weight.data for n in library}
        self.now: dict[str, str] = {}

    def set(self, labels: dict[str, str]) -> None:
        for name, label in labels.items():
            if self.now.get(name) != label:
                W = self.float[name]
                self.model.get_submodule(name).weight.data = self.library[name][label].to(W.dtype)
                self.now[name] = label

    def restore(self) -> None:
        for name, W in self.float.items():
            self.model.get_submodule(name).weight.data = W
        self.now.clear()


@dataclass(frozen=True)
class Holdout:
    """The start's and the search's plan's KLD on rows the search never read, and which plan was kept."""
    start_kld: float
    kld: float
    kept: str                        # "search" or "start" (the search's plan was no better on these rows)


def refine(plan: BitPlan, model, library: dict, scorer: AssembledKLD, config: PlannerConfig,
           search: SearchConfig, progress: bool = True,
           holdout: AssembledKLD | None = None) -> tuple[BitPlan, SearchResult, Holdout | None]:
    """The plan after the measured search (plans/search.py) from `plan`, judged by `scorer` on models
    assembled from `library`; the model's float weights are put back. With `holdout` (other rows), the
    search's plan is kept only if it is also better there, else `plan` comes back: a long search fits the
    rows it reads (SmolLM2 at 2.5 bits: 96 evaluations took 6% off the search's rows and added 2% on the
    evaluation text). A guard, not a cure: on two held-out rows it agreed with the evaluation text on 2 of
    the 4 refined rows of docs/results/plan.md."""
    names = [c.name for c in plan.choices]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    allowed, items, budget = plan_items(names, shapes, plan.losses, config)
    labels = [[option_name(g.name, share) for g, share in allowed[n]] for n in names]
    start = tuple(labels[i].index(c.option) for i, c in enumerate(plan.choices))
    assembly = Assembly(model, {n: library[n] for n in names})
    bar = tqdm(total=search.evals, desc="plan: measured search", unit="eval", disable=not progress)

    def assemble(choice):
        assembly.set({n: labels[i][j] for i, (n, j) in enumerate(zip(names, choice))})

    def loss(choice):
        assemble(choice)
        return scorer()

    def step(evals, best):
        bar.n = evals
        bar.set_postfix(kld=f"{best:.4g}")
        bar.refresh()

    check = None
    try:
        result = evolve(items, budget, start, loss, search, step)
        if holdout is not None:
            assemble(start)
            before = holdout()
            assemble(result.choice)
            after = holdout()
            check = Holdout(before, after, "search" if after < before else "start")
    finally:
        assembly.restore()
        bar.close()
    chosen = start if check is not None and check.kept == "start" else result.choice
    return plan_of(names, shapes, allowed, items, chosen, config, plan.losses), result, check
