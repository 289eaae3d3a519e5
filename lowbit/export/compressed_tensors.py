"""`--format compressed-tensors`: the "pack-quantized" checkpoint that vLLM and transformers load.

Layout written (facts from compressed-tensors 0.17.1, the version pinned in the dev extra), per
quantized linear NAME of shape [out, in] with b-bit codes and G groups per row:
  NAME.weight_packed      int32 [out, ceil(in·b/32)]  codes packed along the row, 32/b per word,
                          the first in the low bits (8 4-bit codes per word, code 0 in bits 0-3)
  NAME.weight_scale       float16 [out, G]            (per channel: [out, 1])
  NAME.weight_zero_point  int32 [ceil(out·b/32), G]   asymmetric only, packed along the OUTPUT dim
  NAME.weight_shape       int64 [2] = (out, in)
  NAME.bias               float, when the linear has one
and config.json's `quantization_config` (quant_method compressed-tensors, format pack-quantized,
one config group targeting Linear, the float linears — the LM head — in `ignore`; a per-tensor plan
of several integer formats: one config group per format, targeting its linears by name).

Mapping of lowbit's integer conventions (exact: the reader's W_dq equals lowbit's bit for bit
when loaded in float32):
  * compressed-tensors decodes a signed q = packed − 2^(b−1) and W = s·(q − zp) (zp = 0 when
    symmetric), its packed value is q + 2^(b−1). lowbit's unsigned code u is exactly that packed
    value: symmetric u = c + 2^(b−1) (codes in [−qmax, qmax] ⊂ [−2^(b−1), 2^(b−1)−1]);
    asymmetric zp = z − 2^(b−1), so q − zp = u − z; the packed zero-point is z itself.
  * fp16 scales are stored as they are; loading with dtype float32 keeps them exact.
  * groups: strategy "group" needs a group width dividing every row; lowbit's ragged last group
    (576 = 4×128 + 64) is written as group gcd(g, in…) with each scale repeated (group 64 for
    SmolLM2 g128), per channel as strategy "channel", per tensor as "channel" with one scale
    repeated per row. The codes never change.
  * 2, 4 and 8 bits only: for 3/5/6/7 bits the packed layout differs between compressed-tensors
    releases (32//b codes per word up to 0.17, dense bit streams from 0.18), so a file could be
    decoded wrongly without an error; vLLM's kernels take 4 and 8 bits anyway.
  * transformers 4.57 + compressed-tensors 0.18-0.20 cannot load asymmetric pack-quantized files
    (the zero-point is expected unpacked on the meta device); 0.17.1 loads both.
NormalFloat, FP8 and MXFP4 formats are refused (no uniform integer grid).
A source whose linears quantize their inputs too (W8A8) is written as "int-quantized" instead
(compressed_tensors_w8a8).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .registry import ExportReport, Target

FORMAT = "pack-quantized"
COMPRESSED_TENSORS_VERSION = "0.17.1"     # the layout followed; keep in step with pyproject's pin
BITS = (2, 4, 8)                          # widths whose packing every compressed-tensors release shares


def weights_args(bits: int, symmetric: bool, group_size: int) -> dict:
    """The `weights` QuantizationArgs of the config group."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "group" if group_size else "channel", "group_size": group_size or None,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}}


def quantization_config(bits: int, symmetric: bool, group_size: int, ignore: list[str],
                        schemes: list[tuple[list[str], int, bool, int]] | None = None) -> dict:
    """config.json's `quantization_config`: one scheme applied to every Linear not ignored, or (schemes:
    [(module names, bits, symmetric, group)]) one config group per scheme targeting its modules by name."""
    groups = {"group_0": {"targets": ["Linear"], "weights": weights_args(bits, symmetric, group_size),
                          "input_activations": None, "output_activations": None, "format": FORMAT}}
    if schemes:
        groups = {f"group_{i}": {"targets": list(names), "weights": weights_args(b, sym, g),
                                 "input_activations": None, "output_activations": None, "format": FORMAT}
                  for i, (names, b, sym, g) in enumerate(schemes)}
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def grid_tensors(grid) -> dict:
    """The compressed-tensors tensors of one IntGrid (keys without the module prefix)."""
    import torch

    from .int_layout import pack_int32

    out_features, in_features = grid.shape
    tensors = {"weight_packed": pack_int32(grid.codes, grid.bits),
               "weight_scale": grid.scales.contiguous(),
               "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not grid.symmetric:   # zero-points [out, G] packed along the output dim: pack zᵀ rows, transpose back
        tensors["weight_zero_point"] = pack_int32(grid.zeros.t().contiguous(), grid.bits).t().contiguous()
    return tensors


def write(src: str, out: Path, options: Mapping[str, object]) -> ExportReport:
    from safetensors.torch import save_file

    from .int_layout import regrid, to_grid
    from .quantized_source import copy_tokenizer, int_formats, linear_names, read_quantized, write_config

    source = read_quantized(src, TARGET.name)
    if source.acts:                    # weights and activations: the int-quantized W8A8 layout
        from .compressed_tensors_w8a8 import write_w8a8

        return write_w8a8(source, out)
    formats = int_formats(source, TARGET.name, BITS)
    notes, groups, members = [], {}, {}
    for fmt in formats:                # a plan's formats: one config group each, its modules by name
        members[fmt] = [n for n, q in source.quantized.items() if q.fmt == fmt]
        groups[fmt], more = regrid(fmt, sorted({source.quantized[n].shape[1] for n in members[fmt]}))
        notes += [f"{fmt.name}: {n}" if len(formats) > 1 else n for n in more]
    if any(f.bits == 2 for f in formats):
        notes.append("2-bit codes: transformers with compressed-tensors loads them; vLLM's kernels take 4 and 8 bits")
    tensors = {}
    for name, q in source.quantized.items():
        for key, t in grid_tensors(to_grid(q, groups[q.fmt])).items():
            tensors[f"{name}.{key}"] = t
        if name in source.biases:
            tensors[f"{name}.bias"] = source.biases[name].contiguous()
    tensors.update({k: v.contiguous() for k, v in source.floats.items()})
    ignore = [n for n in linear_names(source.config) if n not in source.quantized]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    first = formats[0]
    schemes = [(members[f], f.bits, f.symmetric, groups[f]) for f in formats] if len(formats) > 1 else None
    write_config(out, source.config, quantization_config(first.bits, first.symmetric, groups[first], ignore, schemes))
    copy_tokenizer(source.path, out, source.config)
    scheme = lambda f: f"int{f.bits} {'sym' if f.symmetric else 'asym'} {'group ' + str(groups[f]) if groups[f] else 'channel'}"
    return ExportReport({"scheme": "; ".join(f"{scheme(f)} ({len(members[f])} linears)" if len(formats) > 1 else scheme(f)
                                             for f in formats),
                         "linears": len(source.quantized), "ignored": ", ".join(ignore) or "-"}, tuple(notes))


TARGET = Target(
    name="compressed-tensors",
    summary="compressed-tensors pack-quantized checkpoint (vLLM; transformers with compressed-tensors), "
            "from a lowbit directory with an integer format; W8A8 sources as int-quantized",
    source="quantized",
    write=write,
)
