"""The planner's Fisher loss (`lowbit plan --loss fisher`): the KL divergence a rounding error E of one
linear is predicted to cost, from one gradient pass instead of one evaluation per (tensor, option).

To second order the KL divergence between the float model and one whose linear W has become W + E is
½ vec(E)ᵀ F vec(E), F the Fisher information of W (the KL's Hessian at the float model). With labels y
sampled from the float model's own next-token distribution, F = E_y[∇ log p(y) ∇ log p(y)ᵀ]; for a
linear o = W x, keeping only the diagonal of the output gradients' second moments (token t, output i:
g_ti = (∂ log p(y) / ∂ o_ti)²), this is

    KLD ≈ ½ · mean_t Σ_i g_ti (e_i · x_t)²

One Hessian per output channel would keep it exactly; instead g_ti is factored as a_t · g_i, with g_i
its mean over tokens and a_t = s_t / mean(s), s_t = Σ_i g_ti (a rank-one fit that keeps both means):

    KLD ≈ ½ Σ_i g_i (E H_g Eᵀ)_ii,   H_g = Σ_t s_t x_t x_tᵀ / Σ_t s_t

H_g is the inputs' second moment weighted by how much each token's outputs move the log-likelihood.
The plain mean Ĥ = mean x xᵀ (the product of two means, as K-FAC takes it) loses what a token with a
large input but a small gradient does: Gemma 3's massive activations (layer 12's down projection) made
the plain product overshoot the measured KLD of GPTQ-rounding that tensor 40-fold; H_g predicts it
within 5%. What is still dropped: the covariance between output channels.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..eval.perplexity import head_logits
from ..formats import Format
from ..plans.planner import option_name, tensor_options
from ..quantize_config import SINK_WEIGHT


# the gradient pass's default rows: 8192 tokens in rows of up to 2048 (see gradient_rows)
GRADIENT_TOKENS, GRADIENT_ROW = 8192, 2048


def gradient_rows(context: int | None, text_tokens: int, tokens: int = GRADIENT_TOKENS,
                  longest: int = GRADIENT_ROW) -> tuple[int, int]:
    """(rows, tokens per row) for the gradient pass: rows as long as `longest`, the model's context and the
    text allow, and enough of them for about `tokens` tokens.

    Why long rows: what rounding a tensor costs depends on the context it is used at. Gemma 3's global
    layers attend over the whole row and its local ones over 512 tokens; Fisher losses from 512-token rows
    gave its early layers 2-3.5x the cost that 2048-token rows give them, and plans that lost to uniform
    int4-g64 at ctx 2048 (docs/results/plan.md)."""
    if text_tokens < 2:
        raise ValueError(f"the text has {text_tokens} tokens: too few for a gradient pass")
    row = min(longest, text_tokens - 1, context or longest)
    return -(-tokens // row), row                 # ceil: at least `tokens` tokens in all


def fisher_weighted_error(E: torch.Tensor, H: torch.Tensor, g: torch.Tensor) -> float:
    """½ Σ_i g_i (E H Eᵀ)_ii: E [out, in] a rounding error, H [in, in] the inputs' mean x xᵀ, g [out] the
    outputs' mean squared log-likelihood gradient — the predicted KLD per token."""
    E = E.double()
    return 0.5 * float((((E @ H.double()) * E).sum(dim=1) * g.double()).sum())   # row i: e_i H e_iᵀ, weighted by g_i


@contextmanager
def _no_weight_grads(model):
    """Parameters frozen inside the block (the gradients wanted are the activations', not the weights')."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass(frozen=True)
class OutputFisher:
    """What one gradient pass gives each named linear (analysis.fisher's docstring names them).

    g       {name: [d_out] float64}: mean over tokens (and draws) of the squared gradient of Σ_t log p(y_t)
            with respect to the linear's output, y_t drawn from the float model's own distribution at t
    H_g     {name: [d_in, d_in] float64}: Σ_t s_t x_t x_tᵀ / Σ_t s_t, s_t the token's Σ_i g_ti
    H       {name: [d_in, d_in] float64}: the inputs' plain mean x xᵀ (empty unless asked for)
    tokens  how many tokens (rows' tokens × draws) the means are over
    """
    g: dict
    H_g: dict
    H: dict
    tokens: int


def _sampled_loglik_backward(model, ids: torch.Tensor, gen: torch.Generator, chunk: int) -> None:
    """Backward of Σ_t log p(y_t) over `ids` [B, T], y_t drawn from the model's own p at t. The logits are
    made `chunk` positions at a time, each chunk's backward stopping at the decoder's output, then one
    backward through the decoder: a vocabulary of V costs chunk × V floats, not B·T × V."""
    h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state      # [B, T, d]
    h_free = h.detach().requires_grad_()
    flat = h_free.reshape(-1, h.shape[-1])                                          # [B, T, d] -> [B·T, d]
    for c in range(0, flat.shape[0], chunk):
        logp = F.log_softmax(head_logits(model, flat[c:c + chunk]).float(), dim=-1)  # [c, V]
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)               # [c, 1]
        logp.gather(1, y).sum().backward()
    h.backward(h_free.grad)


def output_fisher(model, rows: torch.Tensor, names: list[str], draws: int = 1, seed: int = 0,
                  batch: int = 1, plain: bool = False, chunk: int = 512) -> OutputFisher:
    """The Fisher statistics of each named linear on `rows` [N, L], from `draws` forward/backward passes
    per row (`batch` rows at a time, logits `chunk` positions at a time); plain: also the inputs'
    unweighted mean x xᵀ."""
    gen = torch.Generator().manual_seed(seed)
    g_sum: dict[str, torch.Tensor] = {}
    Hg_sum: dict[str, torch.Tensor] = {}
    s_sum: dict[str, float] = {}
    H_sum: dict[str, torch.Tensor] = {}
    tokens = 0

    def capture(name):
        def fn(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()     # [B, T, d_in] -> [B·T, d_in]
            if plain:
                H_sum[name] = H_sum.get(name, 0) + x.T @ x

            def on_grad(grad):
                d = grad.detach().reshape(-1, grad.shape[-1]).double()       # [B, T, d_out] -> [B·T, d_out]
                d2 = d * d
                g_sum[name] = g_sum.get(name, 0) + d2.sum(dim=0)
                s = d2.sum(dim=1)                                             # [B·T]: each token's s_t
                Hg_sum[name] = Hg_sum.get(name, 0) + (x * s[:, None]).T @ x
                s_sum[name] = s_sum.get(name, 0.0) + float(s.sum())
            out.register_hook(on_grad)
        return fn

    hooks = [model.get_submodule(n).register_forward_hook(capture(n)) for n in names]
    # the graph starts at the embeddings' output: every activation after it needs a gradient, no weight does
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
    try:
        with _no_weight_grads(model), torch.enable_grad():
            for _ in range(draws):
                for i in range(0, rows.shape[0], batch):
                    ids = rows[i:i + batch]
                    _sampled_loglik_backward(model, ids, gen, chunk)
                    tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    # a linear whose outputs never move the likelihood (s ≡ 0) has g ≡ 0: its loss is 0 whatever H_g is
    H_g = {n: Hg_sum[n] / s_sum[n] if s_sum[n] > 0 else Hg_sum[n] for n in names}
    # every draw adds the same inputs again: the plain sums are over `tokens` (rows' tokens × draws)
    return OutputFisher({n: g_sum[n] / tokens for n in names}, H_g,
                        {n: H_sum[n] / tokens for n in names} if plain else {}, tokens)


@torch.no_grad()
def fisher_losses(model, spec, rows: torch.Tensor, names: list[str], fmts: list[Format], shares: tuple[float, ...] = (),
                  beside: tuple[str, ...] | None = None, hessian_rows: torch.Tensor | None = None, draws: int = 1,
                  seed: int = 0, rounding: str = "gptq", progress: bool = True) -> dict:
    """{tensor: {option: ½ Σ_i g_i (E H_g Eᵀ)_ii}} with E the error of the option's rounding: GPTQ's (as
    `lowbit quantize --plan … --method gptq` stores it) or to nearest ("rtn"); g, H_g from `rows` [N, L].
    hessian_rows [M, L']: the rows whose inputs give GPTQ (and outlier choice) its Hessians (default: `rows`'
    plain x xᵀ;
    GPTQ fitted on the rows it is judged on looks better than it is, the more so the coarser the format)."""
    from tqdm.auto import tqdm

    from .tensor_losses import input_hessians, rounded

    # without hessian_rows GPTQ and the outliers are fitted on the gradient rows' plain input moments
    stats = output_fisher(model, rows, names, draws, seed, plain=hessian_rows is None)
    layer_of = {n: int(n.removeprefix(spec.layers + ".").split(".")[0]) for n in names}
    H_fit, block = {}, None
    out = {}
    for name in tqdm(names, desc="plan: Fisher losses", unit="tensor", disable=not progress):
        if hessian_rows is not None and (rounding == "gptq" or shares) and layer_of[name] != block:
            # one block's Hessians at a time: all of a large model's at once would not fit in memory
            block = layer_of[name]
            H_fit = input_hessians(model, hessian_rows, [n for n in names if layer_of[n] == block],
                                   sink_weight=SINK_WEIGHT)[0]               # as `lowbit quantize` counts them
        W = model.get_submodule(name).weight.data.float()
        fit = H_fit.pop(name) if name in H_fit else stats.H.get(name)
        out[name] = {}
        for f, share in tensor_options(fmts, shares, tuple(W.shape), beside):
            W_dq = rounded(W, f, share, fit, rounding)
            out[name][option_name(f.name, share)] = fisher_weighted_error(W_dq - W, stats.H_g[name], stats.g[name])
        del stats.H_g[name]                                               # done with it: free its memory
        stats.H.pop(name, None)
    return out
