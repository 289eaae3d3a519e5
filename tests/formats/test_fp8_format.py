"""FP8Format: equals torch's own float8 cast with an absmax / fp8_max scale."""
import pytest
import torch

from lowbit.formats import FP8Format

DTYPES = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
@pytest.mark.parametrize("g", [0, -1])
def test_fp8_equals_torch_cast(kind, g):
    torch.manual_seed(1)
    W_f = torch.randn(16, 80) * torch.logspace(-3, 1, 16).unsqueeze(1)
    fmt = FP8Format(kind, g)
    q = fmt.quantize(W_f)
    dtype, fp8_max = DTYPES[kind]
    absmax = W_f.abs().amax() if g == -1 else W_f.abs().amax(1, keepdim=True)
    scale = absmax / fp8_max
    expect = (W_f / scale).to(dtype).float() * scale
    assert q.scales.dtype == torch.float32 and q.scales.shape == ((1, 1) if g == -1 else (16, 1))
    assert torch.equal(fmt.dequantize(q), expect)
    assert torch.equal(q.codes, (W_f / scale).to(dtype).view(torch.uint8))


def test_fp8_zero_row_and_clip_saturates():
    W_f = torch.randn(3, 32)
    W_f[0] = 0
    fmt = FP8Format("e4m3", 0)
    W_dq = fmt.dequantize(fmt.quantize(W_f, torch.full((3, 1), 0.5)))
    assert torch.isfinite(W_dq).all() and bool((W_dq[0] == 0).all())
    half = W_f.abs().amax(1, keepdim=True) / 2
    assert bool((W_dq.abs() <= half * (1 + 1e-6)).all())


def test_fp8_names_and_validation():
    assert FP8Format().name == "fp8-e4m3-ch"
    assert FP8Format("e5m2", -1).name == "fp8-e5m2-tensor"
    for kwargs in (dict(kind="e3m4"), dict(group_size=64), dict(group_size=-2)):
        with pytest.raises(ValueError):
            FP8Format(**kwargs)
