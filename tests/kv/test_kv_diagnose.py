"""lowbit.kv.diagnose: the attention KL is the softmax KL it claims, the K facts measure what they say,
and the captured q/k are the ones the model attends with."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.kv.diagnose import GROUP, attention_kl, capture, diagnose, k_facts
from kv_fixtures import tiny  # noqa: F401  (pytest fixtures)


def _causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None]


def test_attention_kl_is_the_softmax_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    k_hat = k + 0.3 * torch.randn(k.shape, generator=g)
    total, n = 0.0, 0
    for h in range(4):
        for t in range(6):
            kv = h // 2                                           # grouped-query: query heads 0,1 read K head 0
            s = 0.5 * k[0, kv, :t + 1] @ q[0, h, t]
            s_hat = 0.5 * k_hat[0, kv, :t + 1] @ q[0, h, t]
            p, p_hat = s.softmax(0), s_hat.softmax(0)
            total += float((p * (p.log() - p_hat.log())).sum())
            n += 1
    assert attention_kl(q, k, k_hat, _causal(6), 0.5) == pytest.approx(total / n, rel=1e-5)
    assert attention_kl(q, k, k, _causal(6), 0.5) == 0.0


def test_k_facts_bias_and_group_variance():
    T = 4 * GROUP
    constant = torch.full((1, 2, T, 4), 3.0)
    assert k_facts(constant + 1e-3 * torch.randn(constant.shape))["bias_share"] == pytest.approx(1.0, abs=1e-5)
    steps = torch.arange(T).div(GROUP, rounding_mode="floor").float()      # constant inside each 32-token group
    k = steps[None, None, :, None].expand(1, 2, T, 4).clone()
    facts = k_facts(k)
    assert facts["within_group_var"] == pytest.approx(0.0, abs=1e-12)
    assert facts["bias_share"] == pytest.approx(1.5 ** 2 / (sum(i * i for i in range(4)) / 4))
    noise = torch.randn(1, 2, T, 4, generator=torch.Generator().manual_seed(1))
    assert k_facts(noise)["within_group_var"] == pytest.approx(1.0, abs=0.15)   # i.i.d.: no temporal structure


def test_captured_queries_and_keys_are_what_the_model_attends_with(tiny):
    ids = torch.randint(0, 257, (40,), generator=torch.Generator().manual_seed(3))
    seen = capture(tiny, ids)
    assert sorted(seen) == list(range(tiny.dims.n_layers))
    q, k, allowed, scaling = seen[0]
    assert scaling == pytest.approx(1 / math.sqrt(q.shape[-1]))
    assert torch.equal(allowed[0, 0], _causal(40)[0, 0])
    # layer 0's attention output recomputed from the captured q, k and the layer's own v projection
    attention, seen_v, seen_o = tiny.model.model.layers[0].self_attn, [], []
    hooks = [attention.v_proj.register_forward_hook(lambda m, a, out: seen_v.append(out)),
             attention.o_proj.register_forward_pre_hook(lambda m, a: seen_o.append(a[0]))]
    with torch.no_grad():
        tiny.model(input_ids=ids[None], use_cache=False)
    for h in hooks:
        h.remove()
    D = q.shape[-1]
    v = seen_v[0].view(1, 40, -1, D).transpose(1, 2)                   # [1, T, Hkv*D] -> [1, Hkv, T, D]
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    rep = q.shape[1] // k.shape[1]
    s = (scaling * q @ k.repeat_interleave(rep, 1).transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    mine = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, 40, -1)                         # [1, H, T, D] -> [1, T, H*D]
    assert torch.allclose(mine, seen_o[0], atol=1e-10)


def test_diagnose_ranks_finer_quantizers_as_cheaper(tiny):
    ids = torch.randint(0, 257, (2 * GROUP,), generator=torch.Generator().manual_seed(4))
    result = diagnose(tiny, ids)
    assert len(result["layers"]) == tiny.dims.n_layers
    m = result["mean"]
    assert 0 < m["turboquant4"]["plain"] < m["turboquant2.5"]["plain"]
    assert all(v["plain"] >= 0 and v["centered"] >= 0 for v in m.values())


def test_diagnose_with_unit_scales_repeats_the_unscaled_columns(tiny):
    """Statistics whose q and K energies agree give scales of 1: the scaled columns equal the plain ones."""
    from lowbit.kv.key_scales import KeyStats

    ids = torch.randint(0, 257, (2 * GROUP,), generator=torch.Generator().manual_seed(5))
    energy = {layer: torch.ones(2, 24, dtype=torch.float64) for layer in range(tiny.dims.n_layers)}
    zeros = {layer: torch.zeros(2, 24, dtype=torch.float64) for layer in range(tiny.dims.n_layers)}
    m = diagnose(tiny, ids, KeyStats(energy, energy, zeros, 1, "t"))["mean"]
    for v in m.values():
        assert v["scaled"] == pytest.approx(v["plain"], rel=1e-9)
        assert v["centered_scaled"] == pytest.approx(v["centered"], rel=1e-9)
