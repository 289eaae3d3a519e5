"""The analysis' int8 prediction: an outlier channel makes per-tensor int8 lossy, per-token less so,
and smoothing moves the error into the weights (the activation error drops)."""
from __future__ import annotations

import torch

from lowbit.analysis.int8_error import int8_errors


def test_a_planted_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 9] *= 80                                       # a systematic outlier channel
    w = [torch.randn(32, 64, generator=g)]
    e = int8_errors(x, x.abs().amax(0), w)
    assert e["per_tensor_smoothed"] < e["per_tensor"] / 3
    assert e["per_token"] <= e["per_tensor"]
    clean = int8_errors(torch.randn(256, 64, generator=g), torch.full((64,), 4.0), w)
    assert clean["per_tensor"] < 1e-3                    # a well-behaved input loses little at 8 bits
