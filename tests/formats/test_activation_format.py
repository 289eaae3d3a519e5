"""Activation formats: validation, names, error bounds, static scales; the int8 kernel equals the
simulated reference; LLM.int8()'s split takes out exactly the outlier columns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats import IntFormat
from lowbit.formats.activation import (ActFormat, act_format_from_dict, act_format_from_name, act_params,
                                       dequantize_act, fake_quantize_act, quantize_act, static_scale)
from lowbit.nn.act_linear import int8_eligible, outlier_columns, weight_int8
from lowbit.nn.qlinear import QuantLinear

NAMES = ["a8-token-sym", "a8-tensor-sym", "a8-static-sym", "a8-static-sym-p99.9", "a4-token-asym-clip0.9",
         "a8-token-sym-split6", "a4-g32-sym", "a8-g16-asym"]


@pytest.mark.parametrize("name", NAMES)
def test_names_and_dicts_round_trip(name):
    fmt = act_format_from_name(name)
    assert fmt.name == name
    assert act_format_from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=9), "bits"), (dict(granularity="row"), "granularity"), (dict(granularity="group"), "group_size"),
    (dict(clip=0.0), "clip"), (dict(clip=1.5), "clip"), (dict(granularity="static", symmetric=False), "static"),
    (dict(outlier_threshold=0.0), "threshold"), (dict(outlier_threshold=-6.0), "threshold"),
    (dict(calibration="mse"), "calibration")])
def test_bad_formats_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ActFormat(**kwargs)


def test_unknown_name_lists_the_syntax():
    with pytest.raises(ValueError, match="a8-token-sym"):
        act_format_from_name("int8-token")


@pytest.mark.parametrize("name", ["a8-token-sym", "a8-tensor-sym", "a4-token-asym", "a4-g32-sym", "a8-g16-asym"])
def test_round_trip_error_is_at_most_half_a_step(name):
    fmt = act_format_from_name(name)
    x = torch.randn(37, 64) * torch.linspace(0.1, 20, 64)      # columns of very different ranges
    x[3, 5] = 300.0                                            # one outlier
    codes, scale, zero = quantize_act(x, fmt)
    assert torch.equal(codes, codes.round())
    lo, hi = (-fmt.qmax, fmt.qmax) if fmt.symmetric else (0, fmt.qmax)
    assert codes.min() >= lo and codes.max() <= hi
    x_dq = dequantize_act(codes, scale, zero, fmt)
    # every element is within half its group's step of the input (no clipping at clip 1)
    err = (x - x_dq).abs()
    if fmt.granularity == "token":
        bound = scale.reshape(-1, 1) / 2
    elif fmt.granularity == "tensor":
        bound = scale.reshape(1, 1) / 2
    else:
        bound = scale.expand(-1, -1, fmt.group_size).reshape(x.shape) / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())
    assert torch.equal(fake_quantize_act(x, fmt), x_dq)


def test_per_token_scales_isolate_an_outlier_token():
    x = torch.randn(8, 64)
    x[2] *= 1000
    per_token = (fake_quantize_act(x, act_format_from_name("a8-token-sym")) - x)[[0, 1, 3]].abs().max()
    per_tensor = (fake_quantize_act(x, act_format_from_name("a8-tensor-sym")) - x)[[0, 1, 3]].abs().max()
    assert per_token * 100 < per_tensor


def test_static_scales_absmax_and_percentile():
    fmt = act_format_from_name("a8-static-sym")
    assert torch.allclose(static_scale(fmt, absmax=12.7), torch.tensor([0.1]))
    rows = torch.arange(1, 10001, dtype=torch.float32).reshape(100, 100)
    p = act_format_from_name("a8-static-sym-p99")
    assert torch.allclose(static_scale(p, rows=rows), torch.tensor([9900.0 / 127]))
    clipped = act_format_from_name("a8-static-sym-clip0.5")
    assert torch.allclose(static_scale(clipped, absmax=12.7), torch.tensor([0.05]))
    with pytest.raises(ValueError, match="calibrated scale"):
        act_params(rows, fmt)


def test_static_codes_saturate_beyond_the_calibrated_range():
    fmt = act_format_from_name("a8-static-sym")
    codes, _, _ = quantize_act(torch.tensor([[0.5, 2.0, -5.0]]), fmt, static_scale(fmt, absmax=1.0))
    assert codes.tolist() == [[64.0, 127.0, -127.0]]


KERNEL_CASES = [("int8-ch-sym", "a8-token-sym"), ("int8-ch-sym-signed", "a8-token-asym"),
                ("int8-tensor-sym", "a8-tensor-sym"), ("int4-ch-sym-signed", "a8-token-sym"),
                ("int8-ch-sym", "a8-static-sym"), ("int8-ch-sym", "a4-token-asym"),
                ("int8-ch-sym", "a8-token-sym-split3")]


def _linear(wname, aname, seed=0, bias=True):
    from lowbit.formats import format_from_name

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 80, generator=g)
    fmt, act = format_from_name(wname), act_format_from_name(aname)
    scale = static_scale(act, absmax=4.0) if act.static else None
    b = torch.randn(48, generator=g) if bias else None
    return QuantLinear(fmt.quantize(W), b, act, scale), g


@pytest.mark.parametrize("wname, aname", KERNEL_CASES)
def test_int8_kernel_equals_the_simulated_path(wname, aname):
    module, g = _linear(wname, aname)
    assert "W_c" in module._buffers                       # the integer kernel is what runs
    x = torch.randn(2, 33, 80, generator=g) * 1.5
    y_int = module(x)
    module.kernel = "simulated"
    y_sim = module(x)
    assert torch.allclose(y_int, y_sim, rtol=1e-5, atol=1e-5 * float(y_sim.abs().max()))


@pytest.mark.parametrize("wname, aname", KERNEL_CASES[:5])
def test_int8_accumulation_is_the_exact_integer_product(wname, aname):
    """torch._int_mm on the reference codes equals their product in float64 (no rounding at all)."""
    module, g = _linear(wname, aname, bias=False)
    x = torch.randn(40, 80, generator=g)
    codes, scale, zero = quantize_act(x, module.act, module._buffers.get("input_scale"))
    c = codes if zero is None else codes - 128
    acc = torch._int_mm(c.to(torch.int8), module.W_c)
    exact = c.double() @ weight_int8(module.codes, module.fmt).double().T
    assert torch.equal(acc.double(), exact)


@pytest.mark.parametrize("name", ["a8-token-sym", "a8-tensor-sym", "a8-static-sym", "a4-token-sym-clip0.9",
                                  "a8-token-asym"])
def test_the_kernel_s_codes_are_the_reference_codes(name):
    from lowbit.nn.act_linear import int8_codes

    act = act_format_from_name(name)
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 30, 96)
    x[7] = 0.0                                            # an all-zero token
    scale = static_scale(act, absmax=20.0) if act.static else None
    codes, _, zero = quantize_act(x, act, scale)
    fast, _, fast_zero = int8_codes(x, act, scale)
    assert torch.equal(fast.float(), codes if zero is None else codes - 128)


def test_kernel_eligibility():
    from lowbit.formats import format_from_name

    a = act_format_from_name("a8-token-sym")
    assert int8_eligible(format_from_name("int8-ch-sym"), a)
    assert not int8_eligible(format_from_name("int8-g32-sym"), a)            # scales vary along k
    assert not int8_eligible(format_from_name("int8-ch-asym"), a)
    assert not int8_eligible(format_from_name("int8-ch-sym"), act_format_from_name("a8-g16-sym"))
    assert not int8_eligible(format_from_name("int8-ch-sym"), None)


@pytest.mark.parametrize("kernel", ["auto", "simulated"])
def test_llm_int8_takes_out_exactly_the_planted_column(kernel):
    module, g = _linear("int8-ch-sym", "a8-token-sym-split6")
    module.kernel = kernel
    x = torch.randn(64, 80, generator=g).clamp(-3, 3)
    x[17, 11] = 40.0                                      # one outlier in column 11
    assert outlier_columns(x, 6.0).nonzero().flatten().tolist() == [11]
    y = module(x)
    assert module.outliers.nonzero().flatten().tolist() == [11] and module.forwards == 1
    # column 11 in float (with the de-quantized weights), the rest quantized per token
    x_in = x.clone()
    x_in[:, 11] = 0
    per_token = act_format_from_name("a8-token-sym")
    expected = F.linear(fake_quantize_act(x_in, per_token), module.W_dq, module.bias) + x[:, 11:12] @ module.W_dq[:, 11:12].T
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-4)
    # without the split the outlier's scale flattens its token: the split is closer to float
    exact = F.linear(x, module.W_dq, module.bias)
    module.set_act(per_token)
    assert (module(x) - exact).abs().max() > 5 * (y - exact).abs().max()
