"""`--method awq` for GGUF: AWQ scales searched for each tensor's GGUF type, folded into the float
model before the GGUF calibration pass and quantizers run.

The search is lowbit's AWQ (methods/awq.py) through the calibration walker, with the float
weights throughout (the model is left unchanged until the plan is applied). Each linear's
candidate scalings are judged on an integer grid shaped like its GGUF type (PROXIES: same bits,
same block width, same symmetric/affine kind): the GGUF quantizers search scales and mins per
block and cost ~0.3 s a tensor, the integer grid a millisecond, and AWQ only needs to rank the
α values. Each window's first token counts SINK_WEIGHT times in the Hessians, as in every
other calibrated path.
"""
from __future__ import annotations

import torch

from ...errors import LowbitError
from ...formats import Format, IntFormat
from ...methods.awq import AwqConfig, AwqPlan, search_layer
from .mixes import tensor_type
from .names import family_for, gguf_name

# GGUF type -> the integer grid AWQ judges it on: (bits, symmetric, block width). The symmetric
# types store codes in [-2^(b-1), 2^(b-1) - 1] with d = absmax / 2^(b-1) ("absmax_half"); Q8_0
# uses [-127, 127] ("absmax"). IQ4_NL's non-uniform 16 levels are judged as a 4-bit grid.
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


@torch.no_grad()
def awq_gguf_plan(loaded, mix: str, samples: torch.Tensor, config: AwqConfig = AwqConfig(),
                  sink_weight: float | None = None, progress: bool = True) -> AwqPlan:
    """AWQ scales for every decoder layer of `loaded` for GGUF mix `mix`, from calibration
    samples [N, L]. The model is not changed; fold the plan with methods.awq.apply_awq_plan."""
    from ...calibration.walker import walk
    from ...quantize import SINK_WEIGHT, sink_hessians

    sink_weight = SINK_WEIGHT if sink_weight is None else float(sink_weight)
    spec, head_dim = loaded.spec, loaded.dims.head_dim
    types = linear_types(loaded, mix)
    if all(t not in PROXIES for t in types.values()):
        raise LowbitError(f"--method awq needs a quantized --type; {mix} leaves every linear in float")
    plan = AwqPlan(meta={"method": "awq", "config": vars(config).copy(), "format": f"gguf {mix}",
                         "family": spec.family})

    def solve(index: int, layer: torch.nn.Module, stats: dict) -> None:
        H = {name: stats[name].hessian for name in spec.linears}  # a group's linears share one tensor
        if sink_weight != 1.0:
            H0 = sink_hessians(loaded.model, layer, spec, samples[:, :1])
            H = {name: H[name] + (sink_weight - 1.0) * H0[name] for name in spec.linears}
        fmts = {name: proxy_format(types[index, name]) for name in spec.linears}
        saliences = {name: stats[name].mean_abs for name in spec.linears}
        try:
            plan.scales[index], _ = search_layer(layer, spec, H, saliences, fmts, config, head_dim)
        except ValueError as e:
            raise LowbitError(f"layer {index}: AWQ: {e}") from None

    walk(loaded.model, spec, samples, solve, {"hessian", "mean_abs"}, progress=progress)
    return plan
