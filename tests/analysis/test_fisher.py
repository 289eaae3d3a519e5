"""The planner's Fisher loss (analysis.fisher): the weighted error is the sum it names; the output
gradients' second moments give the measured KL divergence to second order where the factorisation is
exact (one token, an error in one output channel); the pass leaves the model as it found it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.analysis.fisher import fisher_losses, fisher_weighted_error, output_fisher
from lowbit.formats import format_from_name
from lowbit.models.load import load
from lowbit.plans.planner import decoder_linears


def test_weighted_error_is_the_rows_quadratic_forms():
    g = torch.Generator().manual_seed(0)
    E, X, w = torch.randn(5, 7, generator=g), torch.randn(20, 7, generator=g), torch.rand(5, generator=g)
    H = (X.T @ X / 20).double()
    brute = 0.5 * sum(float(w[i]) * float(E[i].double() @ H @ E[i].double()) for i in range(5))
    assert fisher_weighted_error(E, H, w) == pytest.approx(brute, rel=1e-12)


def _kl(p_logits, q_logits):
    """KL(p || q) per row of logits [N, V]."""
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("fixture,linear", [("tiny_llama_dir", "mlp.down_proj"), ("tiny_llama_dir", "self_attn.v_proj"),
                                            ("tiny_gemma3_dir", "self_attn.o_proj")])
def test_one_token_one_channel_matches_the_measured_kl(request, fixture, linear):
    loaded = load(str(request.getfixturevalue(fixture)))
    model = loaded.model.double()
    name = f"{loaded.spec.layers}.1.{linear}"
    module = model.get_submodule(name)
    # 4000 draws of y for one token (a batch of the same one-token row): the factorisation is exact there
    rows = torch.full((4000, 1), 65)
    g, H, tokens = output_fisher(model, rows, [name], batch=4000, seed=3)
    assert tokens == 4000
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(module.weight.shape[1], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = model(input_ids=rows[:1]).logits[0]
        for i in (0, 3):                                         # an error in output channel i only
            E = torch.zeros_like(module.weight)
            E[i] = 1e-3 * v / v.norm()
            module.weight += E
            kl = float(_kl(ref, model(input_ids=rows[:1]).logits[0]).squeeze())
            module.weight -= E
            predicted = fisher_weighted_error(E, H[name], g[name])
            assert predicted == pytest.approx(kl, rel=0.1), (i, predicted, kl)


def test_the_pass_leaves_no_grads_hooks_or_frozen_weights(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    model = loaded.model
    names = decoder_linears(model, loaded.spec)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    rows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    g, H, tokens = output_fisher(model, rows, names, draws=2)
    assert tokens == 2 * 48
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    for n in names:
        W = model.get_submodule(n).weight
        assert g[n].shape == (W.shape[0],) and bool((g[n] > 0).all())
        assert H[n].shape == (W.shape[1], W.shape[1])
        X = []                                                   # Ĥ is the mean x xᵀ of the inputs, counted once per token
        h = model.get_submodule(n).register_forward_hook(lambda m, a, o: X.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(input_ids=rows)
        h.remove()
        X = torch.cat(X).double()
        assert torch.allclose(H[n], X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)


def test_losses_fall_with_bits(tiny_llama_dir):
    """On the tiny model every tensor's Fisher loss falls from 2 to 4 to 8 bits."""
    loaded = load(str(tiny_llama_dir))
    names = decoder_linears(loaded.model, loaded.spec)
    fmts = [format_from_name(f) for f in ("int2-g32-sym-signed", "int4-g32-sym-signed", "int8-g32-sym-signed")]
    rows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    losses = fisher_losses(loaded.model, loaded.spec, rows, names, fmts, progress=False)
    for n in names:
        two, four, eight = (losses[n][f.name] for f in fmts)
        assert two > four > eight > 0, n
