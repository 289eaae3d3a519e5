"""Perplexity and KLD follow the stated convention exactly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.eval.kld import ReferenceWindow, token_kld, token_scores
from lowbit.eval.perplexity import evaluate, make_windows
from lowbit.models.load import load


def test_windows_drop_partial_and_keep_order():
    ids = torch.arange(10)
    w = make_windows(ids, 3, None)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(ids, 3, 2).shape == (2, 3)
    with pytest.raises(LowbitError, match="3 windows"):
        make_windows(ids, 3, 4)
    with pytest.raises(LowbitError, match="fewer than one window"):
        make_windows(ids, 11, None)


def test_ppl_is_exp_of_mean_window_nll(tiny_llama_dir):
    model = load(str(tiny_llama_dir)).model
    ids = torch.randint(0, 257, (3 * 50 + 7,), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, ids, ctx=50, progress=False)
    manual = []
    with torch.no_grad():
        for i in range(3):
            x = ids[i * 50:(i + 1) * 50]
            logits = model(x[None]).logits[0]
            manual.append(F.cross_entropy(logits[:-1], x[1:]).item())
    assert res.windows == 3 and res.tokens == ids.numel()
    assert res.window_nll == pytest.approx(manual, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(sum(manual) / 3), rel=1e-6)
    assert res.kld is None


def test_kld_against_itself_is_zero_and_positive_otherwise(tiny_llama_dir):
    model = load(str(tiny_llama_dir)).model
    other = load(str(tiny_llama_dir)).model
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    ids = torch.randint(0, 257, (100,), generator=torch.Generator().manual_seed(0))
    same = evaluate(model, ids, ctx=50, reference=model, progress=False)
    assert same.kld.mean == pytest.approx(0.0, abs=1e-6) and same.kld.top1_changed == 0.0
    assert same.kld.predictions == 2 * 49
    diff = evaluate(other, ids, ctx=50, reference=model, progress=False)
    assert diff.kld.mean > 1e-4 and diff.kld.p99 >= diff.kld.mean


def test_token_kld_matches_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    kl, changed = token_kld(a, b, chunk=3)
    p, q = a.softmax(-1), b.softmax(-1)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum(-1), atol=1e-6)
    assert torch.equal(changed, a.argmax(-1) != b.argmax(-1))


@pytest.mark.parametrize("scale, atol, rtol", [(1e-3, 5e-7, 0.0), (0.3, 0.0, 1e-3)])
def test_token_scores_match_cross_entropy_and_token_kld(scale, atol, rtol):
    """The fast path evaluation uses equals the definitions, for a close model (KL ~4e-7 per
    token, where float32 cancellation would show: held within 5e-7 nats of float64, tighter than
    token_kld's own ~6e-7) and a distant one (~0.04: within 0.1%); chunks that do not divide T."""
    g = torch.Generator().manual_seed(1)
    ref_logits = 4 * torch.randn(301, 5000, generator=g)
    logits = ref_logits + scale * torch.randn(301, 5000, generator=g)
    targets = torch.randint(0, 5000, (301,), generator=g)
    nll, kl, changed = token_scores(logits, targets, ReferenceWindow(ref_logits, chunk=64))
    changed_def = token_kld(ref_logits, logits)[1]
    lp_ref, lp = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl_f64 = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    assert torch.allclose(nll, F.cross_entropy(logits, targets, reduction="none"), rtol=1e-5, atol=1e-5)
    assert torch.allclose(kl.double(), kl_f64, rtol=rtol, atol=atol)
    assert torch.equal(changed, changed_def)
    nll_alone, none_kl, none_changed = token_scores(logits, targets)
    assert torch.equal(nll_alone, nll) and none_kl is None and none_changed is None
    _, self_kl, self_changed = token_scores(ref_logits, targets, ReferenceWindow(ref_logits, chunk=64))
    assert torch.all(self_kl == 0) and not self_changed.any()


@pytest.mark.parametrize("family", ["llama", "gemma3-capped"])
def test_blocked_head_scoring_equals_whole_logits(family, tiny_llama_dir, tiny_gemma3_dir, monkeypatch):
    """Windows over LOGITS_BUDGET are scored from final hidden states in blocks of positions;
    ppl, window losses, KLD and top-1 changes equal the whole-logits path (Gemma with soft-capping)."""
    import lowbit.eval.perplexity as perplexity

    path = tiny_llama_dir if family == "llama" else tiny_gemma3_dir
    model, other = load(str(path)).model.double(), load(str(path)).model.double()
    if family != "llama":
        for m in (model, other):
            m.config.final_logit_softcapping = 3.0    # tiny logits: a cap this low changes them
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    ids = torch.randint(0, 257, (2 * 40,), generator=torch.Generator().manual_seed(0))
    models = {"ref": model, "other": other}
    whole = perplexity.evaluate_many(models, ids, 40, reference=model, progress=False)
    monkeypatch.setattr(perplexity, "LOGITS_BUDGET", 0)
    monkeypatch.setattr(perplexity, "BLOCK", 7)              # 39 predictions: blocks of 7 and a ragged 4
    blocked = perplexity.evaluate_many(models, ids, 40, reference=model, progress=False)
    for name in models:
        assert blocked[name].window_nll == pytest.approx(whole[name].window_nll, rel=1e-9)
        assert blocked[name].kld.mean == pytest.approx(whole[name].kld.mean, rel=1e-6, abs=1e-9)
        assert blocked[name].kld.top1_changed == whole[name].kld.top1_changed
    assert blocked["other"].kld.mean > 1e-6           # the comparison is not of equal models


def test_blocked_head_scoring_refuses_logits_it_cannot_rebuild(tiny_llama_dir, monkeypatch):
    import lowbit.eval.perplexity as perplexity

    model = load(str(tiny_llama_dir)).model
    model.config.logit_scale = 2.0          # a post-processing the split head does not apply

    class Scaled(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.config = base, base.config

        def forward(self, *args, **kwargs):
            out = self.base(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

        def get_decoder(self):
            return self.base.get_decoder()

        def get_output_embeddings(self):
            return self.base.get_output_embeddings()

    monkeypatch.setattr(perplexity, "LOGITS_BUDGET", 0)
    ids = torch.randint(0, 257, (40,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LowbitError, match="cannot be scored in blocks"):
        perplexity.evaluate(Scaled(model), ids, 40, progress=False)
