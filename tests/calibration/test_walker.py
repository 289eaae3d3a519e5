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
@pytest.mark.parametrize("offload", [False, True])
def test_statistics_equal_full_model_forward(request, tmp_path, arch, offload):
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
                   offload=tmp_path if offload else None, progress=False)
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


def test_nan_is_named(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="layer 0.*mlp.down_proj"):
        walk(loaded.model, loaded.spec, _samples(1), lambda *a: None, {"absmax"}, progress=False)
