"""Quantized linear used at run time: weights de-quantized once; with an activation format the
input is quantized on every forward too (nn.act_linear: the integer kernel where the formats
allow it, else the simulated reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import QTensor
from ..formats.activation import ActFormat
from .act_linear import int8_eligible, int8_forward, simulated_forward, weight_int8

KERNELS = ("auto", "simulated")  # auto: the int8 kernel when int8_eligible


def hold_qtensor(module: nn.Module, q: QTensor) -> None:
    """Give `module` q's format, shape and its codes/scales/zeros as buffers (the saved state)."""
    module.fmt = q.fmt
    module.out_features, module.in_features = q.shape
    module.register_buffer("codes", q.codes)
    module.register_buffer("scales", q.scales)
    module.register_buffer("zeros", q.zeros)


def held_qtensor(module: nn.Module) -> QTensor:
    """The QTensor hold_qtensor stored on `module`."""
    return QTensor(module.codes, module.scales, module.zeros, (module.out_features, module.in_features), module.fmt)


class QuantLinear(nn.Module):
    """y = Q_a(x) W_dqᵀ + b, where W_dq = fmt.dequantize(codes, scales, zeros) and Q_a the
    activation format's quantize–de-quantize (identity without one).

    input_transform "hadamard": x is first rotated online by the normalized Hadamard (x Mᵀ; the
    weight was quantized as W Mᵀ: lowbit.rotations' R4).
    outliers (methods.outliers.SparseOutliers): weights kept in float16 beside the low-bit part
    (buffers outlier_index / outlier_values); W_dq takes their values.
    The integer codes, scales and zero-points (and a static activation format's input_scale)
    are the module's state; the float weight is a deterministic function of them, computed once
    and cached (not saved), so a reloaded module computes bit-identical outputs.
    With act.outlier_threshold (LLM.int8()), `outliers` counts per input column how many
    forwards took it out, and `forwards` the forwards seen (reset_outlier_counts clears both).
    """

    def __init__(self, q: QTensor, bias: Tensor | None = None, act: ActFormat | None = None,
                 input_scale: Tensor | None = None, kernel: str = "auto", input_transform: str | None = None,
                 input_signs: Tensor | None = None, output_signs: Tensor | None = None, outliers=None):
        super().__init__()
        if input_transform not in (None, "hadamard"):
            raise ValueError(f"unknown input transform {input_transform!r} (known: hadamard)")
        if input_signs is not None and input_transform is None:
            raise ValueError("input signs go with an input transform")
        self.input_transform = input_transform   # online rotation of x before anything else (R4, QuIP)
        for name, signs, n in (("input_signs", input_signs, q.shape[1]), ("output_signs", output_signs, q.shape[0])):
            if signs is not None:
                if signs.shape != (n,) or not bool((signs.abs() == 1).all()):
                    raise ValueError(f"{name} must be [{n}] of ±1")
                self.register_buffer(name, signs.detach().to(torch.int8).clone())
        hold_qtensor(self, q)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        W_dq = self.fmt.dequantize(q)
        if outliers is not None:     # dense-and-sparse: the kept float16 weights replace the dense values
            if tuple(outliers.shape) != tuple(q.shape):
                raise ValueError(f"outliers of a {outliers.shape} weight on a {q.shape} linear")
            self.register_buffer("outlier_index", outliers.index.clone())
            self.register_buffer("outlier_values", outliers.values.clone())
            W_dq = outliers.apply(W_dq)
        self.register_buffer("W_dq", W_dq, persistent=False)
        self.act = None
        self.kernel = kernel
        self.set_act(act, input_scale)

    def set_act(self, act: ActFormat | None, input_scale: Tensor | None = None) -> None:
        """Give the linear an activation format (None: weight-only); static formats need input_scale [1]."""
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r} (known: {', '.join(KERNELS)})")
        if act is not None and act.static and input_scale is None:
            raise ValueError(f"activation format {act.name} is static: it needs a calibrated input_scale")
        self.act = act
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale.detach().float().reshape(1).clone())
        elif "input_scale" in self._buffers:
            del self._buffers["input_scale"]
        self.reset_outlier_counts()
        if int8_eligible(self.fmt, act):
            self.register_buffer("W_c", weight_int8(self.codes, self.fmt).T, persistent=False)  # [in, out]
            self.register_buffer("w_scale", self.scales.float().reshape(1, -1), persistent=False)  # [1, out|1]
        else:
            self._buffers.pop("W_c", None)
            self._buffers.pop("w_scale", None)

    def forget_dequantized(self) -> None:
        """Drop the float W_dq (and int8 copy), keeping the stored state: for a layer that is written out
        and never run (lazy RTN); a forward afterwards fails on the meta tensor."""
        for name in ("W_dq", "W_c"):
            if self._buffers.get(name) is not None:
                self._buffers[name] = torch.empty(self._buffers[name].shape, dtype=self._buffers[name].dtype,
                                                  device="meta")

    @property
    def outlier_bits(self) -> int:
        """Stored bits of the dense-and-sparse part (0 without one)."""
        from ..formats.sparse import sparse_bits

        index = self._buffers.get("outlier_index")
        return 0 if index is None else sparse_bits(index, self.outlier_values)

    def reset_outlier_counts(self) -> None:
        self.outliers = torch.zeros(self.in_features, dtype=torch.long)
        self.forwards = 0

    @property
    def qtensor(self) -> QTensor:
        return held_qtensor(self)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight: lets code that reads `.weight` (tying checks, hooks) keep working."""
        return self.W_dq

    def forward(self, x: Tensor) -> Tensor:
        if self.input_transform is not None:
            from ..rotations.hadamard import hadamard_transform

            signs = self._buffers.get("input_signs")
            x = hadamard_transform(x if signs is None else x * signs.to(x.dtype))
        out_signs = self._buffers.get("output_signs")
        bias = self.bias if out_signs is None else None       # added after the output transform
        if self.act is None:
            y = F.linear(x, self.W_dq.to(x.dtype), bias)
        else:
            scale = self._buffers.get("input_scale")
            if self.kernel == "auto" and "W_c" in self._buffers:
                y, cols = int8_forward(x, self.W_c, self.w_scale, self.W_dq, bias, self.act, scale)
            else:
                y, cols = simulated_forward(x, self.W_dq, bias, self.act, scale)
            if cols is not None:
                self.outliers += cols.to(torch.long)
                self.forwards += 1
        if out_signs is not None:
            from ..rotations.hadamard import hadamard_transform

            y = hadamard_transform(y) * out_signs.to(y.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        act = "" if self.act is None else f", act={self.act.name}"
        rot = "" if self.input_transform is None else f", input_transform={self.input_transform}"
        rot += ", output_transform=hadamard" if "output_signs" in self._buffers else ""
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt.name}{act}{rot}"
