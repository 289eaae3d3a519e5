"""The planner's Fisher loss (analysis.fisher): the weighted error is the sum it names; the output
gradients' second moments give the measured KL divergence to second order where the factorisation is
exact (one token, an error in one output channel); the token-weighted input moment H_g is the sum it
names, and with it the prediction is the per-token sum wherever the gradients factor as a_t · g_i;
the pass leaves the model as it found it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.analysis.fisher import fisher_losses, fisher_weighted_error, gradient_rows, output_fisher
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
    stats = output_fisher(model, rows, [name], batch=4000, seed=3)
    assert stats.tokens == 4000
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
            predicted = fisher_weighted_error(E, stats.H_g[name], stats.g[name])
            assert predicted == pytest.approx(kl, rel=0.1), (i, predicted, kl)


def test_the_pass_leaves_no_grads_hooks_or_frozen_weights(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    model = loaded.model
    names = decoder_linears(model, loaded.spec)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    rows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = output_fisher(model, rows, names, draws=2, plain=True)
    assert stats.tokens == 2 * 48
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert output_fisher(model, rows, names[:1]).H == {}                # the plain moments only when asked for
    for n in names:
        W = model.get_submodule(n).weight
        assert stats.g[n].shape == (W.shape[0],) and bool((stats.g[n] > 0).all())
        assert stats.H[n].shape == stats.H_g[n].shape == (W.shape[1], W.shape[1])
        X = []                                                   # Ĥ is the mean x xᵀ of the inputs, counted once per token
        h = model.get_submodule(n).register_forward_hook(lambda m, a, o: X.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(input_ids=rows)
        h.remove()
        X = torch.cat(X).double()
        assert torch.allclose(stats.H[n], X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)


def test_token_weighted_moment_is_its_sum(tiny_gemma3_dir):
    """H_g = Σ_t s_t x_t x_tᵀ / Σ_t s_t and g = mean_t g_ti, from the inputs and output gradients of the same
    pass (same seed, so the same sampled labels) captured by hooks beside the function's own."""
    loaded = load(str(tiny_gemma3_dir))
    model = loaded.model.double()
    names = [f"{loaded.spec.layers}.0.mlp.down_proj", f"{loaded.spec.layers}.1.self_attn.q_proj"]
    rows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))
    X, D = {n: [] for n in names}, {n: [] for n in names}

    def capture(n):
        def fn(m, a, out):
            X[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))            # [1, T, d_in] -> [T, d_in]
            out.register_hook(lambda grad: D[n].append(grad.reshape(-1, grad.shape[-1])))   # -> [T, d_out]
        return fn
    hooks = [model.get_submodule(n).register_forward_hook(capture(n)) for n in names]
    try:
        stats = output_fisher(model, rows, names, seed=5)
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        x, d2 = torch.cat(X[n]), torch.cat(D[n]) ** 2
        s = d2.sum(dim=1)
        assert torch.allclose(stats.g[n], d2.mean(dim=0), rtol=1e-10)
        assert torch.allclose(stats.H_g[n], (x * s[:, None]).T @ x / s.sum(), rtol=1e-10, atol=1e-14)


def test_prediction_is_the_per_token_sum_when_gradients_factor():
    """Where g_ti = a_t · b_i the rank-one factorisation is exact: ½ Σ_i g_i (E H_g Eᵀ)_ii equals the
    per-token ½ mean_t Σ_i g_ti (e_i · x_t)², even with one token's input 100× the others' and its
    gradient near zero — where the plain mean x xᵀ overshoots by orders of magnitude."""
    gen = torch.Generator().manual_seed(6)
    T, d_in, d_out = 64, 12, 5
    x = torch.randn(T, d_in, generator=gen, dtype=torch.float64)
    x[0] *= 100                                                  # a massive activation on the first token
    a = torch.rand(T, generator=gen, dtype=torch.float64) + 0.5
    a[0] = 1e-4                                                  # ... whose outputs barely move the likelihood
    b = torch.rand(d_out, generator=gen, dtype=torch.float64)
    g_t = a[:, None] * b[None, :]                                # [T, d_out]
    E = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * 1e-2
    exact = 0.5 * float(((x @ E.T) ** 2 * g_t).sum() / T)
    s = g_t.sum(dim=1)
    H_g = (x * s[:, None]).T @ x / s.sum()
    assert fisher_weighted_error(E, H_g, g_t.mean(dim=0)) == pytest.approx(exact, rel=1e-10)
    plain = fisher_weighted_error(E, x.T @ x / T, g_t.mean(dim=0))
    assert plain > 20 * exact


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


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_chunked_logits_change_nothing(request, fixture):
    """The head applied to the decoder's output gives the model's own logits, and the gradient pass with
    its logits made 5 positions at a time gives the statistics of one made all at once (same labels: a
    row of 5 tokens per chunk draws them in the same order)."""
    loaded = load(str(request.getfixturevalue(fixture)))
    model = loaded.model.double()
    rows = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(7))
    from lowbit.eval.perplexity import head_logits
    with torch.no_grad():
        assert torch.allclose(head_logits(model, model.get_decoder()(input_ids=rows).last_hidden_state),
                              model(input_ids=rows).logits, atol=1e-9)
    names = decoder_linears(model, loaded.spec)[:3]
    one, chunked = (output_fisher(model, rows, names, seed=2, batch=2, chunk=c) for c in (10, 5))
    for n in names:
        assert torch.allclose(one.g[n], chunked.g[n], rtol=1e-9)
        assert torch.allclose(one.H_g[n], chunked.H_g[n], rtol=1e-9)


@pytest.mark.parametrize("context,text_tokens,rows", [
    (8192, 250_000, (4, 2048)),         # SmolLM2 on WikiText-2 validation: 4 rows of 2048
    (None, 250_000, (4, 2048)),         # a config without a context length
    (256, 250_000, (32, 256)),          # a short context: more, shorter rows
    (32768, 1250, (7, 1249)),           # the built-in sample text: one row as long as it allows
])
def test_gradient_rows_are_long_and_cover_the_tokens(context, text_tokens, rows):
    n, length = gradient_rows(context, text_tokens)
    assert (n, length) == rows
    assert length <= min(2048, context or 2048, text_tokens - 1) and n * length >= 8192 > (n - 1) * length


def test_gradient_rows_refuse_an_empty_text():
    with pytest.raises(ValueError, match="too few"):
        gradient_rows(2048, 1)
