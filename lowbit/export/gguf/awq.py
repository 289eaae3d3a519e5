"""`--method awq` for GGUF: AWQ scales searched for each tensor's GGUF type, folded into the float
model before the GGUF calibration pass and quantizers run.

The search is lowbit's AWQ (methods/awq.py) through the calibration walker, with the float
weights throughout (the model is left unchanged until the plan is applied). Each candidate
scaling is judged by the output error of the real quantized tensors: GGUFGrid quantizes W·diag(s)
with lowbit's GGUF quantizer of that tensor's type, weighted by the imatrix of the scaled inputs,
as the export will (about 0.3 s a tensor: minutes for a model). grid="proxy" judges on an integer
grid shaped like the type instead (PROXIES: same bits, block width, symmetric/affine kind; a
millisecond a tensor). Each window's first token counts SINK_WEIGHT times in the Hessians, as in
every other calibrated path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import LowbitError
from ...formats import Format, IntFormat
from ...formats.gguf import dequantize_gguf, quantize_gguf
from ...methods.awq import AwqConfig, AwqPlan, search_layer
from .mixes import tensor_type
from .names import family_for, gguf_name

# GGUF type -> the integer grid AWQ judges it on: (bits, symmetric, block width). The symmetric
# types store codes in [-2^(b-1), 2^(b-1) - 1]; the proxy takes d = absmax / 2^(b-1)
# ("absmax_half"), a stand-in: Q4_0/Q5_0's own rule is "signed" (d = -m / 2^(b-1), m the
# largest-magnitude weight, sign kept) and the K-quants search d. The GGUF AWQ results in the
# README were measured with this proxy. Q8_0 uses [-127, 127] ("absmax"). IQ4_NL's non-uniform
# 16 levels are judged as a 4-bit grid.
PROXIES = {
    "Q8_0": (8, True, 32, "absmax"),
    "Q4_0": (4, True, 32, "absmax_half"), "Q4_1": (4, False, 32, "absmax"),
    "Q5_0": (5, True, 32, "absmax_half"), "Q5_1": (5, False, 32, "absmax"),
    "IQ4_NL": (4, True, 32, "absmax_half"),
    "Q2_K": (2, False, 16, "absmax"), "Q3_K": (3, True, 16, "absmax_half"),
    "Q4_K": (4, False, 32, "absmax"), "Q5_K": (5, False, 32, "absmax"),
    "Q6_K": (6, True, 16, "absmax_half"),
}


def proxy_format(type_name: str) -> Format:
    """The integer format AWQ's search uses for a tensor of GGUF type `type_name`."""
    # a linear a mix keeps in F16 (no block type fits its rows) adds next to nothing to a group's
    # error: judge it on the finest grid rather than leave it out of the sum
    bits, symmetric, width, rule = PROXIES.get(type_name, PROXIES["Q8_0"])
    return IntFormat(bits=bits, symmetric=symmetric, group_size=width, scale_rule=rule)


@dataclass(frozen=True, eq=False)
class GGUFGrid:
    """A GGUF type as AWQ's quantizer: W [out, in] -> de-quantized GGUF bytes of W, weighted by
    importance [in] (the imatrix, mean x^2 of the unscaled inputs; None: llama.cpp's default)."""

    type_name: str
    importance: np.ndarray | None = None

    @property
    def group_size(self) -> int:
        """Width of the type's scale blocks (AWQ's weight salience is relative to them)."""
        return PROXIES.get(self.type_name, PROXIES["Q8_0"])[2]

    def _round_trip(self, W: torch.Tensor, importance) -> torch.Tensor:
        if self.type_name in ("F32", "F16"):
            return W.clone()
        data = quantize_gguf(W, self.type_name, imatrix=importance)
        return dequantize_gguf(data, self.type_name, tuple(W.shape))

    def fake_quantize(self, W: torch.Tensor) -> torch.Tensor:
        return self._round_trip(W, self.importance)

    def fake_quantize_scaled(self, W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Q(W·diag(s))·diag(s)⁻¹, Q weighted by the scaled inputs' mean square, importance / s²."""
        imx = None if self.importance is None else self.importance / s.double().pow(2).numpy()
        return self._round_trip(W * s, imx).div_(s)


def linear_types(loaded, mix: str) -> dict[tuple[int, str], str]:
    """{(layer index, linear name in the layer): GGUF type the mix gives that weight}."""
    config, spec = loaded.model.config, loaded.spec
    family = family_for(config.model_type)
    n_layers, n_gqa = config.num_hidden_layers, config.num_attention_heads // config.num_key_value_heads
    layers = loaded.model.get_submodule(spec.layers)
    out = {}
    for index, layer in enumerate(layers):
        for name in spec.linears:
            tensor, block = gguf_name(f"{spec.layers}.{index}.{name}.weight", family)
            shape = tuple(layer.get_submodule(name).weight.shape)  # q/k rows are permuted in the file, not resized
            out[index, name] = tensor_type(mix, tensor, shape, block, n_layers, n_gqa=n_gqa)
    return out


# x^α candidates only: each candidate costs a real GGUF round trip of the group (the search is
# most of an export's time), and the GGUF benchmark rows were measured this way; the GGUF
# quantizers pick their own block scales, so there is no AWQ clip search
GGUF_AWQ = AwqConfig(duo=False, clip=False)


@torch.no_grad()
def awq_gguf_plan(loaded, mix: str, samples: torch.Tensor, config: AwqConfig = GGUF_AWQ,
                  sink_weight: float | None = None, grid: str = "gguf", progress: bool = True) -> AwqPlan:
    """AWQ scales for every decoder layer of `loaded` for GGUF mix `mix`, from calibration
    samples [N, L]; grid "gguf" (the types' own quantizers) or "proxy" (integer grids).
    The model is not changed; fold the plan with methods.awq.apply_awq_plan."""
    from ...calibration.walker import walk
    from ...quantize import SINK_WEIGHT

    if grid not in ("gguf", "proxy"):
        raise ValueError(f"grid must be 'gguf' or 'proxy', got {grid!r}")
    sink_weight = SINK_WEIGHT if sink_weight is None else float(sink_weight)
    spec, head_dim = loaded.spec, loaded.dims.head_dim
    types = linear_types(loaded, mix)
    if all(t not in PROXIES for t in types.values()):
        raise LowbitError(f"--method awq needs a quantized --type; {mix} leaves every linear in float")
    plan = AwqPlan(meta={"method": "awq", "config": vars(config).copy(), "format": f"gguf {mix} ({grid} grid)",
                         "family": spec.family})

    def solve(index: int, layer: torch.nn.Module, stats: dict) -> None:
        H = {name: st.hessian for name, st in stats.items()}   # sink-weighted by the walker
        if grid == "proxy":
            fmts = {name: proxy_format(types[index, name]) for name in spec.linears}
        else:
            fmts = {name: GGUFGrid(types[index, name], stats[name].sq_mean.double().numpy()) for name in spec.linears}
        saliences = {name: stats[name].mean_abs for name in spec.linears}
        try:
            plan.scales[index], _ = search_layer(layer, spec, H, saliences, fmts, config, head_dim)
        except ValueError as e:
            raise LowbitError(f"layer {index}: AWQ: {e}") from None

    wanted = {"hessian", "mean_abs", "sq_mean"} if grid == "gguf" else {"hessian", "mean_abs"}
    walk(loaded.model, spec, samples, solve, wanted, progress=progress, sink_weight=sink_weight)
    return plan
