"""compressed-tensors "int-quantized": W8A8 checkpoints as vLLM's CompressedTensorsW8A8Int8 scheme
loads them (facts from compressed-tensors 0.17.1's naive/int-quantized compressor).

Per quantized linear NAME [out, in]:
  NAME.weight        int8 [out, in]     the signed codes q (lowbit's unsigned u minus 2^(b−1))
  NAME.weight_scale  float16 [out, 1]   per channel (a per-tensor scale repeated per row)
  NAME.input_scale   float32 [1]        static activations only (the calibrated scale)
  NAME.bias          float, when the linear has one
and `quantization_config` with format int-quantized, one config group whose weights are
{int, 8 bits, symmetric, channel} and whose input_activations are {int, 8 bits, symmetric,
strategy token, dynamic} or {strategy tensor, dynamic false} (static).

What transfers exactly: the weight codes and scales, and a static input scale. What a reader
recomputes: a dynamic per-token scale (lowbit: absmax / 127; compressed-tensors' own fake
quantization: absmax / 127.5 with codes in [−128, 127]; vLLM's kernel: absmax / 127), so the
activations of two engines can differ by a rounding step. Refused (one line, the reason): weights
that are not 8-bit symmetric per channel/tensor, per-group or asymmetric activations, a clip
ratio, LLM.int8()'s float columns (no compressed-tensors scheme holds them), mixed activation
formats.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError
from .registry import ExportReport

FORMAT = "int-quantized"


def activation_args(act) -> dict:
    """The `input_activations` QuantizationArgs of an 8-bit symmetric per-token or static format."""
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor" if act.static else "token",
            "group_size": None, "dynamic": not act.static, "actorder": None, "block_structure": None,
            "observer": "minmax" if act.static else None, "observer_kwargs": {}}


def check_w8a8(source) -> tuple:
    """(weight format, activation format) of a source every linear of which is W8A8 as this layout
    holds it; LowbitError naming what is not."""
    from ..formats import IntFormat

    fmts, acts = source.formats(), sorted({a.name for a in source.acts.values()})
    if set(source.acts) != set(source.quantized):
        raise LowbitError("--format compressed-tensors W8A8: every quantized linear needs the same activation "
                          "format (some have none)")
    if len(fmts) != 1 or len(acts) != 1:
        raise LowbitError(f"--format compressed-tensors W8A8 writes one scheme; {source.path} mixes "
                          f"{', '.join([f.name for f in fmts] + acts)}")
    fmt, act = fmts[0], next(iter(source.acts.values()))
    if not (isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric and fmt.group_size in (0, -1)):
        raise LowbitError(f"--format compressed-tensors W8A8 stores int8 symmetric per-channel weights, not {fmt.name}")
    why = ("LLM.int8()'s float columns have no compressed-tensors scheme" if act.outlier_threshold is not None
           else "a clip ratio is not part of the scheme" if act.clip != 1.0
           else "only 8-bit activations" if act.bits != 8
           else "only symmetric activations" if not act.symmetric
           else "only per-token dynamic or per-tensor static activations" if act.granularity not in ("token", "static")
           else None)
    if why:
        raise LowbitError(f"--format compressed-tensors: activation format {act.name}: {why}")
    return fmt, act


def write_w8a8(source, out: Path) -> ExportReport:
    import torch
    from safetensors.torch import save_file

    from .compressed_tensors import COMPRESSED_TENSORS_VERSION, weights_args
    from .quantized_source import copy_tokenizer, linear_names, write_config

    fmt, act = check_w8a8(source)
    tensors = {}
    for name, q in source.quantized.items():
        out_features = q.shape[0]
        tensors[f"{name}.weight"] = (q.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        tensors[f"{name}.weight_scale"] = q.scales.expand(out_features, 1).contiguous()   # [1,1] -> [out,1]
        if act.static:
            tensors[f"{name}.input_scale"] = source.input_scales[name].float().reshape(1).contiguous()
        if name in source.biases:
            tensors[f"{name}.bias"] = source.biases[name].contiguous()
    tensors.update({k: v.contiguous() for k, v in source.floats.items()})
    ignore = [n for n in linear_names(source.config) if n not in source.quantized]
    config = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_args(8, True, 0),
                                      "input_activations": activation_args(act), "output_activations": None,
                                      "format": FORMAT}},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
        "transform_config": {}, "version": COMPRESSED_TENSORS_VERSION}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_config(out, source.config, config)
    copy_tokenizer(source.path, out, source.config)
    notes = ["dynamic per-token input scales are recomputed by the reader (absmax / 127 in vLLM's kernel, "
             "absmax / 127.5 in compressed-tensors' fake quantization)"] if not act.static else []
    return ExportReport({"scheme": f"W8A8 int8 channel, activations {act.name}", "linears": len(source.quantized),
                         "ignored": ", ".join(ignore) or "-"}, tuple(notes))
