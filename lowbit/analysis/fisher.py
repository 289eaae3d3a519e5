"""The planner's Fisher loss (`lowbit plan --loss fisher`): the KL divergence a rounding error E of one
linear is predicted to cost, from one gradient pass instead of one evaluation per (tensor, option).

To second order the KL divergence between the float model and one whose linear W has become W + E is
½ vec(E)ᵀ F vec(E), F the Fisher information of W (the KL's Hessian at the float model). With labels y
sampled from the float model's own next-token distribution, F = E_y[∇ log p(y) ∇ log p(y)ᵀ]; for a
linear o = W x it factors (as K-FAC does) into the output gradients' second moments and the inputs'
Hessian. Keeping only the output gradients' diagonal g:

    KLD ≈ ½ Σ_i g_i (E Ĥ Eᵀ)_ii,   g_i = mean over tokens of (∂ log p(y) / ∂ o_i)²,   Ĥ = mean of x xᵀ

It adds what the proxy tr(E Ĥ Eᵀ) lacks: how much each output channel of the tensor matters downstream
(an attention head that barely moves the logits, a down projection feeding the residual stream). It is
exact, up to the sampling of y, for one token and an E confined to one output channel; elsewhere it
drops the covariance between output channels and between the gradients and the inputs of a token.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..formats import Format
from ..plans.planner import option_name, tensor_options


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


def output_fisher(model, rows: torch.Tensor, names: list[str], draws: int = 1, seed: int = 0,
                  batch: int = 1) -> tuple[dict, dict, int]:
    """Statistics of each named linear on `rows` [N, L], from `draws` forward/backward passes per row:
    ({name: g [d_out] float64}, {name: Ĥ [d_in, d_in] float64}, tokens counted). g is the mean over
    tokens (and draws) of the squared gradient of Σ_t log p(y_t) with respect to the linear's output,
    y_t drawn from the float model's own distribution at t; Ĥ the mean x xᵀ of its inputs."""
    gen = torch.Generator().manual_seed(seed)
    g_sum: dict[str, torch.Tensor] = {}
    H_sum: dict[str, torch.Tensor] = {}
    tokens = 0

    def capture(name):
        def fn(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()     # [B, T, d_in] -> [B·T, d_in]
            H_sum[name] = H_sum.get(name, 0) + x.T @ x

            def on_grad(grad):
                d = grad.detach().reshape(-1, grad.shape[-1]).double()       # [B, T, d_out] -> [B·T, d_out]
                g_sum[name] = g_sum.get(name, 0) + (d * d).sum(dim=0)
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
                    logits = model(input_ids=ids, use_cache=False).logits.float()   # [B, T, V]
                    logp = F.log_softmax(logits, dim=-1)
                    y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
                    logp.reshape(-1, logp.shape[-1]).gather(1, y).sum().backward()    # [B·T, V] -> Σ_t log p(y_t)
                    tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    # every draw adds the same inputs again: both sums are over `tokens` (rows' tokens × draws)
    return ({n: g_sum[n] / tokens for n in names}, {n: H_sum[n] / tokens for n in names}, tokens)


@torch.no_grad()
def fisher_losses(model, spec, rows: torch.Tensor, names: list[str], fmts: list[Format], shares: tuple[float, ...] = (),
                  beside: tuple[str, ...] | None = None, hessian_rows: torch.Tensor | None = None, draws: int = 1,
                  seed: int = 0, rounding: str = "gptq", progress: bool = True) -> dict:
    """{tensor: {option: ½ Σ_i g_i (E Ĥ Eᵀ)_ii}} with E the error of the option's rounding: GPTQ's (as `lowbit
    quantize --plan … --method gptq` stores it) or to nearest ("rtn"); g, Ĥ from `rows` [N, L].
    hessian_rows [M, L']: the rows whose inputs give GPTQ (and outlier choice) its Hessians (default: `rows`;
    GPTQ fitted on the rows it is judged on looks better than it is, the more so the coarser the format)."""
    from tqdm.auto import tqdm

    from .tensor_losses import input_hessians, rounded

    g, H, _ = output_fisher(model, rows, names, draws, seed)
    layer_of = {n: int(n.removeprefix(spec.layers + ".").split(".")[0]) for n in names}
    H_fit, block = {}, None
    out = {}
    for name in tqdm(names, desc="plan: Fisher losses", unit="tensor", disable=not progress):
        if hessian_rows is not None and (rounding == "gptq" or shares) and layer_of[name] != block:
            # one block's Hessians at a time: all of a large model's at once would not fit in memory
            block = layer_of[name]
            H_fit = input_hessians(model, hessian_rows, [n for n in names if layer_of[n] == block])[0]
        W = model.get_submodule(name).weight.data.float()
        fit = H_fit.pop(name) if name in H_fit else H[name]
        out[name] = {}
        for f, share in tensor_options(fmts, shares, tuple(W.shape), beside):
            W_dq = rounded(W, f, share, fit, rounding)
            out[name][option_name(f.name, share)] = fisher_weighted_error(W_dq - W, H[name], g[name])
        del H[name]                                                       # done with it: free its memory
    return out
