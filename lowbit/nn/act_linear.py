"""Forward passes of a linear whose input is quantized too (weights W, activations x).

  simulated  x_dq = fake_quantize_act(x) in float, then x_dq W_dqᵀ: the reference, any formats;
  int8       integer codes of x and W multiplied by torch._int_mm (int32 accumulation), then the
             scales: y[t, n] = s_x[t] · s_w[n] · (Σ_k c_x[t, k] c_w[n, k] − z'[t] Σ_k c_w[n, k]).
             Needs symmetric integer weights with one scale per output channel (or per tensor)
             and ≤ 8-bit codes, and activation scales per token or per tensor (static or dynamic).
LLM.int8()'s split (ActFormat.outlier_threshold T): the input columns where any |x| ≥ T in this
forward are zeroed in the quantized product and multiplied in float with the same W_dq columns
(the float path stores nothing: its weights are the de-quantized int8 ones).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import IntFormat
from ..formats.activation import ActFormat, fake_quantize_act, quantize_act


def int8_eligible(fmt, act: ActFormat | None) -> bool:
    """Whether (weight format, activation format) runs on the integer kernel."""
    return (act is not None and isinstance(fmt, IntFormat) and fmt.symmetric and fmt.group_size in (0, -1)
            and act.granularity != "group")


def weight_int8(codes: Tensor, fmt: IntFormat) -> Tensor:
    """Stored codes [out, in] uint8 (offset 2^(b−1)) -> signed int8 codes [out, in]."""
    return (codes.to(torch.int16) - (1 << (fmt.bits - 1))).to(torch.int8)


def outlier_columns(x2: Tensor, threshold: float | None) -> Tensor | None:
    """[in] bool: the columns of x2 [T, in] holding any |x| ≥ threshold (None without a threshold)."""
    if threshold is None:
        return None
    return (x2.abs() >= threshold).any(0)


def simulated_forward(x: Tensor, W_dq: Tensor, bias: Tensor | None, act: ActFormat,
                      input_scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(y [..., out], outlier columns [in] or None) for x [..., in]: the reference path."""
    x2 = x.reshape(-1, x.shape[-1])                       # [..., in] -> [T, in]
    cols = outlier_columns(x2, act.outlier_threshold)
    W = W_dq.to(x.dtype)
    if cols is None or not bool(cols.any()):
        y = F.linear(fake_quantize_act(x2, act, input_scale), W, bias)
    else:
        x_in = x2.masked_fill(cols, 0.0)                  # outlier columns leave the quantized product
        y = F.linear(fake_quantize_act(x_in, act, input_scale), W, bias) + x2[:, cols] @ W[:, cols].T
    return y.reshape(*x.shape[:-1], -1), cols             # [T, out] -> [..., out]


def int8_forward(x: Tensor, W_c: Tensor, w_scale: Tensor, W_dq: Tensor, bias: Tensor | None, act: ActFormat,
                 input_scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The integer kernel: W_c [in, out] int8 (the signed codes, transposed), w_scale [1, out]
    (or [1, 1]) float32; W_dq only for LLM.int8()'s float columns. Same contract as simulated_forward."""
    x2 = x.reshape(-1, x.shape[-1]).float()               # [..., in] -> [T, in]
    cols = outlier_columns(x2, act.outlier_threshold)
    x_in = x2 if cols is None or not bool(cols.any()) else x2.masked_fill(cols, 0.0)
    codes, scale, zero = quantize_act(x_in, act, input_scale)
    scale = scale.reshape(-1, 1)                          # [T, 1, 1] or [1, 1, 1] -> [T|1, 1]
    if zero is None:
        acc = torch._int_mm(codes.to(torch.int8), W_c)    # [T, out] int32, exact
    else:                                                 # u in 0..255 -> u − 128 fits int8
        acc = torch._int_mm((codes - 128).to(torch.int8), W_c)
        z = (zero.reshape(-1, 1) - 128).to(torch.int32)   # [T|1, 1]: the shifted zero-point
        acc = acc - z * W_c.sum(0, dtype=torch.int32)[None, :]
    y = acc.float() * (scale * w_scale)
    if cols is not None and bool(cols.any()):
        y = y + x2[:, cols] @ W_dq[:, cols].T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1), cols  # [T, out] -> [..., out]
