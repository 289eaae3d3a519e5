"""IntFormat: half-step error bound, ragged groups, scales, zero groups."""
import pytest
import torch

from lowbit.formats import IntFormat
from lowbit.formats.grouping import group_sum, to_groups

CASES = [
    (bits, sym, g)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for g in (64, 128, 0, -1)
]


def _expand_scales(fmt, q):
    """scales [R, G] -> per-element step [out, in] (float32)."""
    ones = torch.ones(q.shape)
    step = to_groups(ones, fmt.group_size) * q.scales.float().unsqueeze(-1)  # [R, G, w]
    if fmt.group_size == -1:
        return step.reshape(q.shape)  # undo per-tensor flattening
    return step.reshape(q.shape[0], -1)[:, : q.shape[1]]  # drop ragged padding


@pytest.mark.parametrize("bits,sym,g", CASES)
def test_error_at_most_half_step(bits, sym, g):
    torch.manual_seed(bits * 10 + g)
    W_f = torch.randn(37, 576) * torch.rand(37, 1) * 3  # g=128 on 576 columns: ragged 64-wide last group
    fmt = IntFormat(bits, sym, g)
    q = fmt.quantize(W_f)
    W_dq = fmt.dequantize(q)
    step = _expand_scales(fmt, q)
    W_e = (W_f - W_dq).abs()
    assert bool((W_e <= step / 2 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("rule", ["absmax", "absmax_half"])
def test_symmetric_scale_rules(rule):
    W_f = torch.randn(16, 96)
    fmt = IntFormat(4, True, 32, rule)
    q = fmt.quantize(W_f)
    absmax = W_f.reshape(16, 3, 32).abs().amax(-1)  # [16, 3] groups
    denom = 7.0 if rule == "absmax" else 7.5
    s = q.scales.float()
    assert bool((s >= absmax / denom).all())  # rounded up to fp16
    assert torch.allclose(s, absmax / denom, rtol=1e-3)
    c = q.codes.int() - 8
    assert int(c.min()) >= (-7 if rule == "absmax" else -8) and int(c.max()) <= 7
    assert bool(((W_f - fmt.dequantize(q)).abs() <= s.repeat_interleave(32, 1) / 2 + 1e-7).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_scale_rule_uses_every_code(bits):
    """llama.cpp's Q4_0 rule: the largest-magnitude entry m lands exactly on code -2^(b-1)
    (s = -m / 2^(b-1)), so each group has qmax + 1 levels on m's side and qmax on the other."""
    torch.manual_seed(bits)
    W_f = torch.randn(64, 128)
    W_f[0, :32] = 0.0                                # an all-zero group: scale 1, codes at the middle
    fmt = IntFormat(bits, True, 32, "signed")
    q = fmt.quantize(W_f)
    half = 1 << (bits - 1)
    Wg = W_f.reshape(64, 4, 32)                       # [out, groups, width]
    m = Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [64, 4] signed extreme
    s = q.scales.float()
    live = m != 0
    assert bool((s[live].sign() == -m[live].sign()).all())
    assert bool((s[live].abs() >= m[live].abs() / half).all())            # fp16 rounded up
    assert torch.allclose(s[live].abs(), m[live].abs() / half, rtol=1e-3)
    codes = q.codes.reshape(64, 4, 32).int() - half   # [out, groups, width] signed codes
    assert int(codes.min()) >= -half and int(codes.max()) <= half - 1
    assert bool((codes.amin(-1)[live] == -half).all())                   # every live group reaches -2^(b-1)
    assert s[0, 0] == 1 and bool((codes[0, 0] == 0).all())
    W_e = (W_f - fmt.dequantize(q)).abs().reshape(64, 4, 32)
    step = s.abs().unsqueeze(-1)                      # [64, 4] -> [64, 4, 1]
    inside = (Wg / step).abs() <= half - 0.5          # not clamped at the short side
    assert bool((W_e[inside] <= step.expand_as(W_e)[inside] / 2 * (1 + 1e-5)).all())
    assert bool((W_e <= step * (1 + 1e-5)).all())
    # one more level than absmax's 2^b - 1 at no extra bits: a smaller error on Gaussian weights
    mse = {rule: float(((W_f - IntFormat(bits, True, 32, rule).fake_quantize(W_f)) ** 2).mean())
           for rule in ("absmax", "signed")}
    assert mse["signed"] < 0.85 * mse["absmax"]


def test_ragged_last_group_uses_only_its_columns():
    torch.manual_seed(0)
    W_f = torch.randn(8, 576)
    for sym in (True, False):
        fmt = IntFormat(4, sym, 128)
        assert fmt.n_groups(576) == 5
        base = fmt.quantize(W_f)
        W_big = W_f.clone()
        W_big[:, -1] = 1000.0  # huge value in the 64-wide last group
        q = fmt.quantize(W_big)
        assert q.scales.shape == (8, 5)
        assert torch.equal(q.scales[:, :4], base.scales[:, :4])
        assert bool((q.scales[:, 4].float() > 50).all())  # 1000/7 or ~1000/15
        # last-group scale comes from the 64 real columns only
        tail = W_f[:, 512:]
        if sym:
            expect = tail.abs().amax(1) / 7
        else:
            lo = tail.amin(1).clamp(max=0)
            expect = (tail.amax(1).clamp(min=0) - lo) / 15
        assert torch.allclose(base.scales[:, 4].float(), expect, rtol=1e-3)


def test_asymmetric_zero_points_and_positive_data():
    W_f = torch.rand(4, 64) + 1.0  # all positive: min clamps to 0, z = 0
    fmt = IntFormat(4, False, 32)
    q = fmt.quantize(W_f)
    assert q.zeros is not None and q.zeros.dtype == torch.uint8
    assert int(q.zeros.max()) == 0
    W_neg = -W_f  # all negative: max clamps to 0, z = 15
    assert int(fmt.quantize(W_neg).zeros.min()) == 15


def test_scales_are_fp16_and_codes_use_stored_scale():
    W_f = torch.randn(8, 64, dtype=torch.bfloat16)
    fmt = IntFormat(4, True, 64)
    q = fmt.quantize(W_f)
    assert q.scales.dtype == torch.float16 and q.codes.dtype == torch.uint8
    W = W_f.float()
    expect = torch.round(W / q.scales.float()).clamp(-7, 7) + 8
    assert torch.equal(q.codes.float(), expect)


@pytest.mark.parametrize("sym", [True, False])
def test_zero_rows_give_no_nan(sym):
    W_f = torch.randn(6, 100)
    W_f[2] = 0.0
    W_f[4, :50] = 0.0
    fmt = IntFormat(3, sym, 50)
    W_dq = fmt.dequantize(fmt.quantize(W_f))
    assert torch.isfinite(W_dq).all()
    assert bool((W_dq[2] == 0).all()) and bool((W_dq[4, :50] == 0).all())


def test_clip_shrinks_range():
    W_f = torch.randn(4, 64)
    fmt = IntFormat(4, True, 32)
    q = fmt.quantize(W_f, torch.full((4, 2), 0.5))
    full = fmt.quantize(W_f)
    assert torch.allclose(q.scales.float(), full.scales.float() / 2, rtol=2e-3)
    with pytest.raises(ValueError):
        fmt.quantize(W_f, torch.full((4, 2), 1.5))


def test_fake_quantize_matches_and_group_sum_ignores_padding():
    W_f = torch.randn(5, 70)
    fmt = IntFormat(5, False, 32)
    assert torch.equal(fmt.fake_quantize(W_f), fmt.dequantize(fmt.quantize(W_f)))
    assert torch.allclose(group_sum(torch.ones(5, 70), 32), torch.tensor([32.0, 32.0, 6.0]).expand(5, 3))


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(group_size=-2),
                                    dict(scale_rule="minmax"), dict(symmetric=False, scale_rule="absmax_half"),
                                    dict(symmetric=False, scale_rule="signed")])
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        IntFormat(**kwargs)


def test_names():
    assert IntFormat(4, True, 64).name == "int4-g64-sym"
    assert IntFormat(4, False, 64).name == "int4-g64-asym"
    assert IntFormat(8, True, 0).name == "int8-ch-sym"
    assert IntFormat(4, True, -1).name == "int4-tensor-sym"


def test_non_finite_input_raises():
    W_f = torch.randn(4, 64)
    W_f[1, 3] = float("nan")
    with pytest.raises(ValueError):
        IntFormat(4, True, 32).quantize(W_f)


@pytest.mark.parametrize("fmt", [IntFormat(4, False, 32), IntFormat(4, True, -1)])
def test_non_finite_input_raises_all_modes(fmt):
    W_f = torch.randn(4, 64)
    W_f[2, 40] = float("inf")
    with pytest.raises(ValueError):
        fmt.quantize(W_f)
