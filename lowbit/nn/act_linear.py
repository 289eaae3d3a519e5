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


def int8_codes(x2: Tensor, act: ActFormat, input_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """quantize_act's codes as int8 (asymmetric: u − 128), scale [T|1, 1], zero [T|1, 1] or None, for
    x2 [T, in] float32. Symmetric per-token/tensor codes take one pass for the absmax (a max-norm,
    no |x| copy); the arithmetic is quantize_act's, so the codes are the same bit for bit."""
    if not act.symmetric or act.granularity == "group":
        codes, scale, zero = quantize_act(x2, act, input_scale)
        if zero is None:
            return codes.to(torch.int8), scale.reshape(-1, 1), None
        return (codes - 128).to(torch.int8), scale.reshape(-1, 1), zero.reshape(-1, 1)
    if act.static:
        scale = input_scale.float().reshape(1, 1)
    else:
        dims = -1 if act.granularity == "token" else None
        amax = torch.linalg.vector_norm(x2, float("inf"), dim=dims, keepdim=True).reshape(-1, 1)   # [T|1, 1]
        scale = amax * (act.clip / act.qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.div(x2, scale).round_().clamp_(-act.qmax, act.qmax).to(torch.int8)
    return codes, scale, None


def int8_forward(x: Tensor, W_c: Tensor, w_scale: Tensor, W_dq: Tensor, bias: Tensor | None, act: ActFormat,
                 input_scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The integer kernel: W_c [in, out] int8 (the signed codes, transposed), w_scale [1, out]
    (or [1, 1]) float32; W_dq only for LLM.int8()'s float columns. Same contract as simulated_forward."""
    x2 = x.reshape(-1, x.shape[-1]).float()               # [..., in] -> [T, in]
    cols = outlier_columns(x2, act.outlier_threshold)
    x_in = x2 if cols is None or not bool(cols.any()) else x2.masked_fill(cols, 0.0)
    codes, scale, zero = int8_codes(x_in, act, input_scale)
    acc = torch._int_mm(codes, W_c)                       # [T, out] int32, exact
    if zero is not None:                                  # u − 128 was multiplied: subtract (z − 128)·Σ_k c_w
        z = (zero - 128).to(torch.int32)                  # [T|1, 1]
        acc = acc - z * W_c.sum(0, dtype=torch.int32)[None, :]
    y = acc.float().mul_(scale).mul_(w_scale)            # in place: [T, out] once, not twice
    if cols is not None and bool(cols.any()):
        y.addmm_(x2[:, cols], W_dq[:, cols].T)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], -1), cols  # [T, out] -> [..., out]
