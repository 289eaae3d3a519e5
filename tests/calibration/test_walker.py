"""The walker feeds each layer exactly what the full model would, sample by sample."""
from __future__ import annotations

import pytest
import torch

from lowbit.calibration.capture import capture_inputs
from lowbit.calibration.walker import walk
from lowbit.errors import LowbitError
from lowbit.models.load import load


def _samples(n=3, length=40, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir"])
@pytest.mark.parametrize("offload,sequential", [(False, False), (True, False), (False, True)])
def test_statistics_equal_full_model_forward(request, tmp_path, arch, offload, sequential):
    loaded = load(str(request.getfixturevalue(arch)))
    model, spec = loaded.model, loaded.spec
    samples = _samples()
    names = [f"{spec.layers}.{i}.{g.linears[0]}" for i in range(loaded.dims.n_layers) for g in spec.groups]
    with capture_inputs(model, names, {"hessian", "absmax", "mean_abs"}) as expected, torch.no_grad():
        for row in samples:                                  # one sample at a time, as the walker does
            model(input_ids=row[None], use_cache=False)
    seen = {}

    def solve(index, layer, stats):
        for name, s in stats.items():
            seen[f"{spec.layers}.{index}.{name}"] = s

    timings = walk(model, spec, samples, solve, {"hessian", "absmax", "mean_abs"},
                   offload=tmp_path if offload else None, progress=False, sequential=sequential)
    assert len(timings) == loaded.dims.n_layers
    for name in names:
        assert seen[name].tokens == samples.numel()
        torch.testing.assert_close(seen[name].hessian, expected[name].hessian, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(seen[name].absmax, expected[name].absmax)
        torch.testing.assert_close(seen[name].mean_abs, expected[name].mean_abs)
    if offload:
        assert list(tmp_path.iterdir()) == []                # offloaded activations cleaned up


def test_sample_independent_of_what_ran_before(tiny_llama_dir):
    """No cache carried between samples: sample B's statistics do not depend on sample A."""
    loaded = load(str(tiny_llama_dir))
    a, b = _samples(1, 40, 1), _samples(1, 40, 2)
    collected = []

    def solve(index, layer, stats):
        if index == 1:
            collected.append(stats["self_attn.q_proj"].hessian.clone())

    walk(loaded.model, loaded.spec, b, solve, {"hessian"}, progress=False)
    walk(loaded.model, loaded.spec, torch.cat([a, b]), solve, {"hessian"}, progress=False)
    walk(loaded.model, loaded.spec, a, solve, {"hessian"}, progress=False)
    torch.testing.assert_close(collected[1] - collected[2], collected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sequential", [False, True])
def test_nan_is_named(tiny_llama_dir, sequential):
    loaded = load(str(tiny_llama_dir))
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="layer 0.*mlp.down_proj"):
        walk(loaded.model, loaded.spec, _samples(1), lambda *a: None, {"absmax"}, progress=False,
             sequential=sequential)


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_causal_masks_become_sdpas_causal_path(request, arch):
    """A plain causal mask is dropped (SDPA's is_causal path); the layers' outputs do not change,
    and masks that are not plain causal (Gemma's sliding window) stay."""
    from lowbit.calibration.walker import ActivationStore, _first_layer_inputs, _plain_causal

    loaded = load(str(request.getfixturevalue(arch)))
    assert loaded.model.config._attn_implementation == "sdpa"
    samples = _samples(1, 40)
    h0 = ActivationStore()
    kwargs = _first_layer_inputs(loaded.model, loaded.spec, samples, h0)
    h = next(iter(h0))
    if arch == "tiny_llama_dir":          # the tiny Gemma's two layers both slide (window 16 < 40)
        assert all(kw["attention_mask"] is None for kw in kwargs)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    assert _plain_causal(causal) and not _plain_causal(causal.float()) and not _plain_causal(causal.triu())
    layers = loaded.model.get_submodule(loaded.spec.layers)
    with torch.no_grad():
        for layer, kw in zip(layers, kwargs):
            if kw["attention_mask"] is None:
                out = layer(h, **kw)
                ref = layer(h, **{**kw, "attention_mask": causal})
                out, ref = (out[0], ref[0]) if loaded.spec.layer_returns_tuple else (out, ref)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            else:
                assert not _plain_causal(kw["attention_mask"])
            h = layer(h, **kw)
            h = h[0] if loaded.spec.layer_returns_tuple else h
