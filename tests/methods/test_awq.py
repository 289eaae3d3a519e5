"""AWQ: the scale search minimises the real output error, clips never hurt, plans fold exactly."""
from __future__ import annotations

import pytest
import torch

from lowbit.calibration.stats import InputStats
from lowbit.formats import IntFormat, MXFP4Format, NFFormat
from lowbit.solve import awq_search
from lowbit.methods.awq import (AwqConfig, apply_awq_plan, output_error, scale_candidates,
                                scaled_hessian, search_clip, search_scales, weight_salience)
from lowbit.models.load import load
from lowbit.transforms import source_scales


def _activations(tokens=1024, n=128, seed=0, outliers=(5, 27), factor=30.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5)
    X[:, list(outliers)] *= factor  # salient channels, as in LLM activations
    return X


def _stats(X):
    st = InputStats(X.shape[1], frozenset({"hessian", "mean_abs"}))
    st.update(X)
    return st


def test_candidates_start_with_no_scaling_and_are_normalised():
    x = torch.rand(64) * 10
    cands = scale_candidates(x, 20)
    assert len(cands) == 20 and cands[0][0] == 0.0 and cands[-1][0] == 1.0
    assert torch.allclose(cands[0][1], torch.ones(64))
    for _, s in cands:
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)


def test_weight_salience_is_relative_to_each_group_absmax():
    W1 = torch.tensor([[1.0, -2.0, 4.0, 0.0], [0.0, 1.0, -1.0, 1.0]])
    W2 = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    # groups of 2 columns; rows of |W| / group absmax: [.5, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]
    assert torch.allclose(weight_salience([W1, W2], 2), torch.tensor([1.5, 2, 2, 1]) / 3)
    # per channel: one group per row (absmax 4, 1, 3)
    assert torch.allclose(weight_salience([W1, W2], -1), torch.tensor([0.25 / 3 + 1 / 3, 0.5 / 3 + 1 / 3,
                                                                      2 / 3, 1 / 3]))


def test_duo_candidates_add_weight_aware_scales_and_never_lose():
    x, w = torch.rand(64) * 10 + 0.1, torch.rand(64) + 0.05
    plain, duo = scale_candidates(x, 20), scale_candidates(x, 20, w)
    assert len(duo) == 2 * 20 - 1 and [a for a, _ in plain] == [a for a, _ in duo if a >= 0]
    s_w0 = dict(duo)[-1.0]  # α = 0: 1 / w̄, normalised
    ref = 1 / (w + 1e-4)
    assert torch.allclose(s_w0, ref / (ref.max() * ref.min()).sqrt(), rtol=1e-5)
    X = _activations()
    st = _stats(X)
    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(64, 128, generator=g) * 0.02]
    Ws[0][:, 40] *= 8  # a column of large weights: the weight-aware term has something to see
    fmt = IntFormat(3, True, 32)
    _, a = search_scales(Ws, st.hessian, st.mean_abs, fmt, 20)
    _, b = search_scales(Ws, st.hessian, st.mean_abs, fmt, 20, weight_salience(Ws, 32))
    assert b["error"] <= a["error"] and b["error_unscaled"] == a["error_unscaled"]


def test_output_error_is_the_error_on_the_tokens():
    X = _activations(256, 64)
    W = torch.randn(32, 64) * 0.02
    W_q = IntFormat(3, True, 32).fake_quantize(W)
    direct = float(((X @ W.T - X @ W_q.T).double() ** 2).sum())
    assert output_error(W, W_q, _stats(X).hessian.float()) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("fmt", [IntFormat(4, True, 64), IntFormat(3, False, 32), NFFormat(4, 64),
                                 IntFormat(3, True, 32, "signed")], ids=lambda f: f.name)
def test_search_beats_unscaled_on_salient_channels(fmt):
    X = _activations()
    st = _stats(X)
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(96, 128, generator=g) * 0.02, torch.randn(48, 128, generator=g) * 0.02]
    s, info = search_scales(Ws, st.hessian, st.mean_abs, fmt, grid=20)
    assert s.shape == (128,) and bool((s > 0).all())
    assert info["alpha"] > 0 and info["error"] < 0.9 * info["error_unscaled"]
    direct = sum(output_error(W, fmt.fake_quantize(W * s) / s, st.hessian.float()) for W in Ws)
    assert direct == pytest.approx(info["error"], rel=1e-6)
    assert float(s[5]) > float(s.median()) and float(s[27]) > float(s.median())  # salient channels scaled up


@pytest.mark.parametrize("fmt", [IntFormat(4, True, 32), IntFormat(3, False, 64), IntFormat(4, True, 0),
                                 MXFP4Format()], ids=lambda f: f.name)
def test_clip_search_never_worse_than_no_clip(fmt):
    X = _activations(512, 96)
    H = _stats(X).hessian
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(2)) * 0.02
    clip = search_clip(W, H, fmt, grid=10, clip_min=0.5)
    assert clip.shape == fmt.scale_shape((40, 96))
    assert bool(torch.isin(clip, torch.linspace(1.0, 0.5, 10)).all())
    assert output_error(W, fmt.fake_quantize(W, clip), H.float()) <= output_error(W, fmt.fake_quantize(W), H.float())
    assert search_clip(W, H, IntFormat(4, True, -1)) is None  # per tensor: nothing to choose per group


def test_clip_sweeps_lower_the_whole_output_error_on_correlated_inputs():
    X = _activations(512, 128)
    X = X + 3 * X[:, :1]  # one direction shared by every channel: the groups' errors interact
    H = _stats(X).hessian.float()
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(5)) * 0.02
    fmt = IntFormat(3, True, 32)
    errors = [output_error(W, fmt.fake_quantize(W, search_clip(W, H, fmt, 16, 0.5, sweeps)), H) for sweeps in (0, 1, 2)]
    assert errors[1] < errors[0] and errors[2] <= errors[1] * (1 + 1e-6)


def test_scaled_hessian_is_the_hessian_of_the_scaled_input():
    X = _activations(128, 32).double()
    s = torch.rand(32, dtype=torch.float64) + 0.5
    torch.testing.assert_close(scaled_hessian(_stats(X).hessian, s), _stats(X / s).hessian)


def test_config_validation():
    for bad in (dict(grid=1), dict(clip="yes"), dict(clip_min=0.0), dict(clip_grid=0), dict(duo=1), dict(clip_sweeps=-1)):
        with pytest.raises(ValueError):
            AwqConfig(**bad)


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_whole_model_plan_is_tied_saveable_and_function_preserving(request, tmp_path, arch):
    loaded = load(str(request.getfixturevalue(arch)))
    model, spec = loaded.model, loaded.spec
    samples = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    fmt = IntFormat(4, True, 32)
    ids = samples[:1]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = awq_search(model, spec, samples, fmt, AwqConfig(grid=5, clip=True, duo=True))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # search leaves the model alone
    assert set(plan.scales) == set(range(loaded.dims.n_layers))
    layer0 = model.get_submodule(spec.layers)[0]
    for group in spec.groups:
        s = plan.scales[0][group.source]
        assert s.shape == (layer0.get_submodule(group.linears[0]).in_features,)
        if group.source_kind == "linear":  # foldable into v / up rows (raises if not tied under GQA)
            source_scales(s, layer0.get_submodule(group.source).out_features, loaded.dims.head_dim)
    assert set(plan.clips[0]) == set(spec.linears)
    back = type(plan).load(plan.save(tmp_path / "plan"))
    apply_awq_plan(model, spec, back)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
