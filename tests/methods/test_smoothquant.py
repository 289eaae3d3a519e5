"""SmoothQuant: the scale formula, the α search, and folding the scales it computes (the walker's
own smooth_layer) leaves Llama, Gemma 3 and Qwen2 models unchanged in float64."""
from __future__ import annotations

import pytest
import torch

from lowbit.calibration.stats import InputStats
from lowbit.formats import format_from_name
from lowbit.formats.activation import act_format_from_name
from lowbit.methods.smoothquant import (SmoothConfig, quantized_output_error, search_alpha, smoothquant_scales,
                                        weight_absmax)
from lowbit.models.load import load
from lowbit.solve_act import SmoothRecord, input_scales, smooth_layer


def test_scale_formula():
    x = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothquant_scales(x, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0                                     # a dead channel keeps a positive scale
    assert torch.allclose(smoothquant_scales(x, w, 1.0)[:2], x[:2])
    assert torch.allclose(smoothquant_scales(x, w, 0.0)[:2], 1 / w[:2])


def test_weight_absmax_is_over_every_linear_of_the_group():
    a, b = torch.tensor([[1.0, -5.0], [2.0, 0.0]]), torch.tensor([[-3.0, 1.0]])
    assert weight_absmax([a, b]).tolist() == [3.0, 5.0]


def test_smoothing_helps_an_outlier_channel_and_the_search_finds_it():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    X[:, 7] *= 60                                       # a systematic outlier channel (the seed's picture)
    Ws = [torch.randn(96, 64, generator=g) * 0.05, torch.randn(32, 64, generator=g) * 0.05]
    fmts = [format_from_name("int8-ch-sym")] * 2
    act = act_format_from_name("a8-tensor-sym")
    xa, wa = X.abs().amax(0), weight_absmax(Ws)
    none = quantized_output_error(X, Ws, fmts, act, torch.ones(64), xa)
    half = quantized_output_error(X, Ws, fmts, act, smoothquant_scales(xa, wa, 0.5), xa)
    assert half < none / 4
    alpha, s, errors = search_alpha(X, xa, wa, Ws, fmts, act)
    assert errors[alpha] == min(errors.values()) and errors[alpha] <= half
    assert torch.equal(s, smoothquant_scales(xa, wa, alpha))


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        SmoothConfig(1.5)
    assert SmoothConfig(None).alpha is None


def _stats(layer, spec, g, wanted):
    """InputStats per group from random inputs with one loud channel (SmoothQuant's case)."""
    stats = {}
    for group in spec.groups:
        width = layer.get_submodule(group.linears[0]).in_features
        st = InputStats(width, frozenset(wanted))
        x = torch.randn(1, 40, width, generator=g, dtype=torch.float64)
        x[..., 3] *= 30
        st.update(x)
        stats.update({name: st for name in group.linears})
    return stats


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("alpha", [0.5, None])
def test_smoothing_is_function_preserving_in_float64(request, monkeypatch, arch, alpha):
    from transformers.models.gemma3 import modeling_gemma3

    def norm64(self, x):    # transformers runs Gemma's norm in float32 even in a float64 model
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", norm64)
    loaded = load(str(request.getfixturevalue(arch)))
    model, spec = loaded.model.double(), loaded.spec
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                               # random norms and biases, so folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    ids = torch.randint(0, 257, (2, 24), generator=g)
    with torch.no_grad():
        before = model(ids).logits
    record, fmt, act = SmoothRecord(), format_from_name("int8-ch-sym"), act_format_from_name("a8-static-sym")
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        stats = _stats(layer, spec, g, {"absmax", "hessian", "rows"})
        fmt_of = {name: fmt for name in stats}
        act_of = {name: act for name in stats}
        H = {name: st.hessian for name, st in stats.items()}
        s_of = smooth_layer(i, layer, spec, loaded.dims.head_dim, stats, fmt_of, act_of, SmoothConfig(alpha), H,
                            {n: None for n in stats}, record)
        assert set(s_of) == set(spec.linears)
        scales = input_scales(stats, act_of, s_of)
        for name, st in stats.items():                  # the static scale covers the smoothed input
            expected = float((st.absmax / s_of[name]).max()) / 127
            assert scales[name].item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-9
    assert set(record.alphas) == {0, 1} and len(record.alphas[0]) == len(spec.groups)
