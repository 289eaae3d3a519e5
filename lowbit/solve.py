"""The calibration walker's solve: per decoder layer, (AWQ search + fold) then each linear's
quantization in its planned format, written back as a QuantLinear.

Formats come per linear from the plan. A GGUF type takes the layer's imatrix (mean x² of its
input) as the importance of its scale search, exactly as llama-imatrix's output would be used;
under GPTQ a uniform GGUF grid gets GPTQ's error compensation (methods.gptq_gguf); other formats
go through gptq_shared, one solve per shared input.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import LowbitError
from .formats import Format, GGUFFormat, QTensor
from .formats.gguf import gguf_type
from .methods.awq import clips_for, output_error, scaled_hessian, search_layer
from .methods.gptq import GptqStats, gptq_outliers, gptq_shared
from .methods.gptq_gguf import gptq_gguf
from .methods.rtn import rtn
from .methods.weighted_grid import WeightedGrid
from .solve_act import SmoothRecord, input_scales, smooth_layer
from .transforms.scaling import fold_scales


def quantize_linear(W_f: torch.Tensor, fmt: Format, config, importance: torch.Tensor | None = None) -> QTensor:
    """Round-to-nearest of one weight: a GGUF type with the imatrix, any other format by RtnConfig."""
    if isinstance(fmt, GGUFFormat):
        return fmt.quantize(W_f, importance=importance)
    return rtn(W_f, fmt, config.rtn)


def calibrated_solve(spec, head_dim: int | None, config, formats: dict[str, Format], write: Callable,
                     plan, acts: dict | None = None, smoothing: SmoothRecord | None = None,
                     on_hessian: Callable | None = None) -> Callable:
    """The walker's solve for config.steps. formats: {full linear name: Format} of the linears to
    quantize; acts: {full linear name: ActFormat} of those whose inputs are quantized too;
    write(layer, name, full_name, q, W_f, fmt, (loss, rtn_loss), (act, input_scale)) stores one
    result; plan: an AwqPlan to record the AWQ scales in (None without AWQ); smoothing: where
    the SmoothQuant step records its α per group; on_hessian(full name, H) sees each linear's input
    Hessian as the walker summed it (the planner's measured search rounds its options on them)."""
    acts = acts or {}
    use_gptq = "gptq" in config.steps

    def solve(index: int, layer: torch.nn.Module, stats: dict) -> None:
        full = {name: f"{spec.layers}.{index}.{name}" for name in stats}
        fmt_of = {name: formats.get(full[name]) for name in stats}        # None: kept in float
        imp = {name: st.sq_mean.double() if "sq_mean" in st.wanted else None for name, st in stats.items()}
        H = {name: st.hessian for name, st in stats.items()}                # sink-weighted by the walker
        H_orig, imp_orig, s_of, clips = dict(H), dict(imp), {}, {}
        if on_hessian is not None:
            for name in stats:
                on_hessian(full[name], H[name])
        act_of = {name: acts.get(full[name]) for name in stats}
        if plan is not None:
            try:
                judges = {n: WeightedGrid(f, imp[n]) if f is None or isinstance(f, GGUFFormat) else f
                          for n, f in fmt_of.items()}
                saliences = {name: stats[name].mean_abs for name in spec.linears}
                scales, _ = search_layer(layer, spec, H, saliences, judges, config.awq, head_dim)
                if config.awq.clip and not use_gptq:
                    clips = clips_for(layer, spec, H, scales, fmt_of, config.awq)
                for group in spec.groups:
                    s = scales[group.source]
                    fold_scales(layer, group, s, norm_offset=spec.norm_offset, head_dim=head_dim)
                    H_group = scaled_hessian(H[group.linears[0]], s)  # the input is now x / s
                    H.update({name: H_group for name in group.linears})
                    imp.update({name: None if imp[name] is None else imp[name] / s.double().pow(2)
                                for name in group.linears})
                    s_of.update({name: s for name in group.linears})
            except ValueError as e:
                raise LowbitError(f"layer {index}: AWQ: {e}") from None
            plan.scales[index] = scales
            if clips:
                plan.clips[index] = clips
        if "smooth" in config.steps:
            try:
                s_of.update(smooth_layer(index, layer, spec, head_dim, stats, fmt_of, act_of, config.smooth, H,
                                         imp, smoothing))
            except ValueError as e:
                raise LowbitError(f"layer {index}: SmoothQuant: {e}") from None
        in_scales = input_scales(stats, act_of, s_of)
        todo = [name for name in stats if fmt_of[name] is not None]  # whole layer or one group
        if config.incoherence is not None:
            _make_incoherent(index, layer, spec, todo, H, config.incoherence)
        shares = {name: outlier_share(config, full[name]) for name in todo}
        solved = _gptq_by_input(index, layer, todo, H, imp, fmt_of, config, shares) if use_gptq else {}
        for name in todo:
            fmt, linear = fmt_of[name], layer.get_submodule(name)
            W_f = linear.weight.detach()
            try:
                if use_gptq:
                    q, st, *sparse = solved[name]
                    loss, rtn_loss = st.proxy_loss, st.rtn_proxy_loss
                else:
                    q = fmt.quantize(W_f, clips[name]) if name in clips else \
                        quantize_linear(W_f, fmt, config, imp[name])
                    loss = None if H[name] is None else output_error(W_f, fmt.dequantize(q), H[name].float())
                    rtn_loss = loss if imp[name] is None or loss is None else \
                        output_error(W_f, fmt.dequantize(quantize_linear(W_f, fmt, config)), H[name].float())
                if name in s_of and H_orig[name] is not None:  # RTN's loss: the weight before the scaling
                    W_0 = W_f.float() / s_of[name]
                    W_0q = fmt.dequantize(quantize_linear(W_0, fmt, config, imp_orig[name]))
                    rtn_loss = output_error(W_0, W_0q, H_orig[name].float())
            except ValueError as e:
                raise LowbitError(f"layer {index} {name}: {e}") from None
            write(layer, name, full[name], q, W_f, fmt, (loss, rtn_loss), (act_of[name], in_scales.get(name)),
                  sparse[0] if use_gptq and sparse else None)

    return solve


def _make_incoherent(index: int, layer: torch.nn.Module, spec, names: list[str], H: dict, inc) -> None:
    """QuIP's incoherence: each named linear's weight becomes W̃ = M_outᵀ W M_inᵀ in place, its
    Hessian M_in H M_inᵀ (one per input group, so GPTQ still shares solves), and the linear is
    marked with its signs for the write-back (rotations.incoherence). Slots come from the spec, so a
    sequential walk solving one group at a time draws the same signs."""
    from .rotations.fuse import input_transform_of
    from .rotations.incoherence import incoherent_hessian, incoherent_weight, signs_for

    done: dict[int, tuple] = {}
    for name in names:
        linear = layer.get_submodule(name)
        if input_transform_of(linear) is not None:
            raise LowbitError(f"layer {index} {name}: incoherence and an online rotation on the same linear")
        group = next(i for i, g in enumerate(spec.groups) if name in g.linears)
        try:
            if id(H[name]) not in done:
                s_in = signs_for(linear.in_features, inc.seed, index, 100 + group)
                H_t = None if H[name] is None else incoherent_hessian(H[name], s_in).to(H[name].dtype)
                done[id(H[name])] = (s_in, H_t)
            s_in, H_t = done[id(H[name])]
            s_out = signs_for(linear.out_features, inc.seed, index, spec.linears.index(name))
        except ValueError as e:
            raise LowbitError(f"layer {index} {name}: {e}") from None
        with torch.no_grad():
            linear.weight.copy_(incoherent_weight(linear.weight, s_in, s_out).to(linear.weight.dtype))
        linear.incoherence_signs = (s_in, s_out)
    for name in names:
        H[name] = done[id(H[name])][1] if id(H[name]) in done else H[name]


def outlier_share(config, full_name: str) -> float:
    """The dense-and-sparse share of one linear: the plan's own for that tensor, else config.outliers."""
    planned = config.plan.outlier_share(full_name) if config.plan is not None else None
    return config.outliers if planned is None else planned


def _gptq_by_input(index: int, layer: torch.nn.Module, names: list[str], H: dict, imp: dict, fmt_of: dict,
                   config, shares: dict[str, float]) -> dict:
    """GPTQ of the named linears: {name: (QTensor, GptqStats[, SparseOutliers])}. Integer/NF/FP8/MX formats
    share one solve per (input, format) (dense-and-sparse: one per weight); a GGUF type is solved per
    linear on its block grid."""
    by_input: dict[tuple, list[str]] = {}
    out, g = {}, config.gptq
    for name in names:
        fmt = fmt_of[name]
        if isinstance(fmt, GGUFFormat):
            W = layer.get_submodule(name).weight
            try:
                if gguf_type(fmt.type_name).set_codes is not None:   # a uniform grid GPTQ rounds onto
                    data, st = gptq_gguf(W, H[name], fmt.type_name, imatrix=imp[name], damp=g.damp)
                    out[name] = (fmt.from_bytes(data, tuple(W.shape)), st)
                else:  # a lookup-table type (IQ4_NL): no uniform grid to round on; the imatrix alone
                    q = fmt.quantize(W, importance=imp[name])
                    loss = output_error(W, fmt.dequantize(q), H[name].float())
                    out[name] = (q, GptqStats(loss, loss, 0.0, 0.0))
            except ValueError as e:
                raise LowbitError(f"layer {index} {name}: {e}") from None
            continue
        by_input.setdefault((id(H[name]), fmt, shares[name]), []).append(name)
    for (_, fmt, share), group in by_input.items():
        try:
            # with the process's intra-op threads: nothing else runs while a group is solved
            options = g.options()
            Ws = [layer.get_submodule(n).weight for n in group]
            results = gptq_outliers(Ws, H[group[0]], fmt, share, layout=config.outlier_layout, **options) if share \
                else gptq_shared(Ws, H[group[0]], fmt, **options)
        except ValueError as e:
            raise LowbitError(f"layer {index} {', '.join(group)}: {e}") from None
        out.update(zip(group, results))
    return out


def awq_search(model: torch.nn.Module, spec, samples: torch.Tensor, fmt: Format, config=None, offload=None,
               progress: bool = False):
    """Search a whole model's AWQ plan on calibration samples [N, L] (float weights throughout;
    the model is left unchanged). Apply it with methods.awq.apply_awq_plan, then quantize."""
    from .calibration.walker import walk
    from .methods.awq import AwqConfig, AwqPlan
    from .models.specs import ModelDims

    config = AwqConfig() if config is None else config
    head_dim = ModelDims.from_config(model.config).head_dim
    plan = AwqPlan(meta={"method": "awq", "config": vars(config).copy(), "format": fmt.to_dict(),
                         "family": spec.family})

    def solve(index, layer, stats):
        hessians = {name: st.hessian for name, st in stats.items()}
        scales, _ = search_layer(layer, spec, hessians, {name: st.mean_abs for name, st in stats.items()},
                                 fmt, config, head_dim)
        plan.scales[index] = scales
        if config.clip:
            plan.clips[index] = clips_for(layer, spec, hessians, scales, fmt, config)

    walk(model, spec, samples, solve, {"hessian", "mean_abs"}, offload=offload, progress=progress)
    return plan
