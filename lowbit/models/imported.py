"""Import quantized Hugging Face checkpoints as lowbit models, codes and scales kept bit for bit.

A Hugging Face directory whose config.json has a `quantization_config` is read by the reader of
its `quant_method`; every quantized linear becomes a QuantLinear holding the checkpoint's own
integer codes, float16 scales and zero-points in an IntFormat (nothing is de-quantized and
re-rounded, so W_dq = s·(u − z) is the checkpoint's grid exactly, computed in float32):
  gptq                 checkpoint_format gptq (v1: zero-points stored minus one) or gptq_v2;
                       2/3/4/8 bits, int32 packing; static groups only (imported_gptq.py)
  awq                  AutoAWQ "gemm" layout, 4 bits with zero-points (imported_gptq.py)
  compressed-tensors   format "pack-quantized", weight-only int 2..8 bits, strategy tensor /
                       channel / group (this file)
Group sizes come from the checkpoint: a GPTQ group_size −1 (per output channel) is lowbit's 0,
compressed-tensors' strategy "tensor" is lowbit's −1; a last group the width does not fill stays
ragged, as lowbit's own groups do. Refused with one LowbitError line: another quant_method or
format, act-order checkpoints whose g_idx is not the static grouping (a column permutation has
no place in a QTensor), activation or KV-cache quantization, transforms, sparsity, scales that
float16 cannot hold exactly, and GPTQ v1 zero-point fields of 2^b − 1 (a zero-point 0 stored
minus one: readers disagree on its value).

Mapping: a linear whose checkpoint says symmetric and whose zero-points are all 2^(b−1) becomes
IntFormat(symmetric=True) (every symmetric scale_rule decodes s·(u − 2^(b−1)); the rule named is
the narrowest whose code range holds the codes: "absmax" [1, 2^b − 1], else "absmax_half" — GPTQ's
and compressed-tensors' own grid —, "signed" when a scale is negative); anything else becomes
IntFormat(symmetric=False) with its uint8 zero-points.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import LowbitError
from ..formats import IntFormat, QTensor
from ..formats.packing import unpack_int32

SUPPORTED = "gptq (checkpoint_format gptq/gptq_v2), awq (version gemm), compressed-tensors (format pack-quantized)"


@dataclass(frozen=True, eq=False)
class RawLinear:
    """One quantized linear as read: unsigned codes u [out, in], float16 scales and uint8
    zero-points z [out, G] (symmetric: z = 2^(b−1)), lowbit's group_size, declared symmetry."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int
    symmetric: bool


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a reader found: the quantized linears (as QTensors), their biases, every other tensor."""

    scheme: str                      # e.g. "gptq v1 int4 group 128 sym"
    quantized: dict[str, QTensor]
    biases: dict[str, Tensor]
    floats: dict[str, Tensor]
    notes: tuple[str, ...] = ()


def quantization_config(path: Path) -> dict | None:
    """config.json's `quantization_config` of the HF directory `path`, or None."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path}/config.json is missing or not valid JSON: {e}") from None
    qc = config.get("quantization_config")
    return qc if qc else None


def reader_for(qc: dict):
    """The reader function of a quantization_config; LowbitError naming what was found otherwise."""
    from . import imported_gptq

    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    readers = {"gptq": imported_gptq.read_gptq, "awq": imported_gptq.read_awq,
               "compressed-tensors": read_compressed_tensors}
    if method not in readers:
        raise LowbitError(f"quantization_config has quant_method {qc.get('quant_method') if isinstance(qc, dict) else qc!r}; "
                          f"lowbit imports {SUPPORTED}")
    return readers[method]


def check(qc: dict) -> None:
    """Refuse an unsupported quantization_config before any tensor is read."""
    reader_for(qc)(qc, None, None, None)


def fp16_scales(scales: Tensor, what: str) -> Tensor:
    """Scales as float16, refusing any value float16 cannot hold exactly (lowbit stores fp16 scales)."""
    if scales.dtype == torch.float16:
        return scales.contiguous()
    half = scales.to(torch.float16)
    off = half.double() != scales.double()          # compared as numbers: no rounding on the way back
    if bool(off.any()):
        n = int(off.sum())
        raise LowbitError(f"{what}: {n} {str(scales.dtype).removeprefix('torch.')} scales have no exact float16 "
                          "value (lowbit stores float16 scales; re-rounding them would change the model)")
    return half.contiguous()


def check_static_groups(g_idx: Tensor | None, group_size: int, in_features: int, what: str) -> None:
    """g_idx must be the static grouping column // group (all zeros per channel); else refuse."""
    if g_idx is None:
        return
    cols = torch.arange(in_features)
    expected = cols // group_size if group_size > 0 else torch.zeros_like(cols)
    if g_idx.numel() != in_features or not torch.equal(g_idx.long().flatten(), expected):
        static = f"column // {group_size}" if group_size > 0 else "all zeros (per channel)"
        raise LowbitError(f"{what}: g_idx is not the static grouping {static} (act-order / desc_act): "
                          "a column permutation is not representable in lowbit's contiguous groups; refused")


def unpack_words(words: Tensor, bits: int, n: int, dense: bool = True) -> Tensor:
    """int32 [rows, words] -> uint8 codes [rows, n]: a dense little-endian stream (pack_int32), or
    (dense=False) 32 // bits codes per word, the first in the low bits, leftover bits unused."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    if dense:
        return unpack_int32(words, bits, n)
    per = 32 // bits
    if words.shape[1] != -(-n // per):
        raise ValueError(f"{words.shape[1]} words per row cannot hold {n} codes of {bits} bits ({per} per word)")
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)   # [rows, words, per]
    return codes.reshape(words.shape[0], -1)[:, :n].to(torch.uint8).contiguous()


def in_model_order(tensors: dict, suffix: str, shapes: dict) -> list[str]:
    """Names of the modules with a tensor NAME + suffix, in the model's module order (unknown names first)."""
    order = {n: i for i, n in enumerate(shapes)}
    return sorted((k[: -len(suffix)] for k in tensors if k.endswith(suffix)), key=lambda n: order.get(n, -1))


def quantized_linears(tensors: dict, suffix: str, shapes: dict, kind: str):
    """(name, label for messages, out, in) of each quantized linear, in model order; LowbitError for a
    tensor the architecture has no linear for."""
    for name in in_model_order(tensors, suffix, shapes):
        what = f"{kind} {name}"
        if name not in shapes:
            raise LowbitError(f"{what}: the architecture has no linear of that name")
        yield (name, what, *shapes[name])


def to_qtensors(raw: dict[str, RawLinear]) -> tuple[dict[str, QTensor], list[str]]:
    """RawLinears -> QTensors; one symmetric scale_rule for the whole checkpoint (see the module doc)."""
    notes = []
    sym = {n for n, r in raw.items() if r.symmetric and bool((r.zeros == 1 << (r.bits - 1)).all())}
    if any(r.symmetric and n not in sym for n, r in raw.items()):
        notes.append("declared symmetric, but some zero-points are not 2^(b-1): imported as asymmetric (exact)")
    rule = "absmax"
    if any(bool((raw[n].scales < 0).any()) for n in sym):
        rule = "signed"
    elif any(bool((raw[n].codes == 0).any()) for n in sym):
        rule = "absmax_half"
    out = {}
    for name, r in raw.items():
        fmt = IntFormat(r.bits, name in sym, r.group_size, rule if name in sym else "absmax")
        out[name] = QTensor(r.codes, r.scales, None if name in sym else r.zeros, tuple(r.codes.shape), fmt)
    return out, notes


# ------------------------------------------------------------------ compressed-tensors pack-quantized

def _version(qc: dict) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(qc.get("version") or "0"))[:3]
    return tuple(int(p) for p in parts) or (0,)


def _ct_scheme(name: str, groups: dict) -> dict:
    """The config group whose targets match linear `name`: its exact name, a "re:" pattern, or "Linear"."""
    for kind in ("name", "re", "class"):
        for group in groups.values():
            for t in group.get("targets") or []:
                if (kind == "name" and t == name) or (kind == "class" and t == "Linear") or \
                        (kind == "re" and t.startswith("re:") and re.match(t[3:], name)):
                    return group
    raise LowbitError(f"compressed-tensors: no config group targets {name}")


def _ct_check(qc: dict) -> dict:
    """The config groups of a supported compressed-tensors config; LowbitError otherwise."""
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    formats = {g.get("format") or fmt for g in groups.values()} if groups else {fmt}
    if formats != {"pack-quantized"}:
        raise LowbitError(f"compressed-tensors format {', '.join(sorted(map(str, formats)))}: lowbit imports "
                          "format pack-quantized (weight-only packed integers) only")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise LowbitError(f"compressed-tensors quantization_status {qc['quantization_status']!r}: lowbit imports "
                          "saved compressed checkpoints only")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise LowbitError(f"compressed-tensors sparsity format {sparsity.get('format')!r} is not supported by import")
    for key in ("transform_config", "kv_cache_scheme"):
        if qc.get(key):
            raise LowbitError(f"compressed-tensors {key} is set: lowbit imports weight-only quantization only")
    if not groups:
        raise LowbitError("compressed-tensors config has no config_groups")
    for gname, g in groups.items():
        w = g.get("weights") or {}
        if g.get("input_activations") or g.get("output_activations"):
            raise LowbitError(f"compressed-tensors {gname} quantizes activations: lowbit imports weight-only "
                              "quantization only")
        if w.get("type") != "int" or not 2 <= int(w.get("num_bits", 0)) <= 8 or w.get("dynamic"):
            raise LowbitError(f"compressed-tensors {gname} weights are {w.get('type')} {w.get('num_bits')}-bit"
                              f"{' dynamic' if w.get('dynamic') else ''}: lowbit imports static int 2..8 bits")
        if w.get("strategy") not in ("tensor", "channel", "group"):
            raise LowbitError(f"compressed-tensors {gname} strategy {w.get('strategy')!r}: lowbit imports "
                              "tensor, channel and group")
        if w["strategy"] == "group" and not (isinstance(w.get("group_size"), int) and w["group_size"] > 0):
            raise LowbitError(f"compressed-tensors {gname} strategy group with group_size {w.get('group_size')!r}")
    return groups


def read_compressed_tensors(qc: dict, tensors: dict | None, shapes: dict | None, path) -> Checkpoint:
    """compressed-tensors pack-quantized -> Checkpoint (consumes the quantized tensors from `tensors`)."""
    groups = _ct_check(qc)
    if tensors is None:
        return None
    dense = _version(qc) >= (0, 18)   # 3/5/6/7 bits: dense streams from 0.18, 32 // b per word before
    raw, biases = {}, {}
    for name, what, out, in_features in quantized_linears(tensors, ".weight_packed", shapes, "compressed-tensors"):
        w = _ct_scheme(name, groups)["weights"]
        bits, offset = int(w["num_bits"]), 1 << (int(w["num_bits"]) - 1)
        packed, scale = tensors.pop(f"{name}.weight_packed"), tensors.pop(f"{name}.weight_scale")
        zp, g_idx = tensors.pop(f"{name}.weight_zero_point", None), tensors.pop(f"{name}.weight_g_idx", None)
        shape = tensors.pop(f"{name}.weight_shape", None)
        if shape is not None and tuple(shape.tolist()) != (out, in_features):
            raise LowbitError(f"{what}: weight_shape {tuple(shape.tolist())} but the model's linear is {(out, in_features)}")
        group = {"tensor": -1, "channel": 0}.get(w["strategy"], w.get("group_size"))
        n_groups = -(-in_features // group) if group and group > 0 else 1
        scale = scale.reshape(1, 1) if group == -1 else scale.reshape(out, -1)
        if scale.shape[1] != n_groups:
            raise LowbitError(f"{what}: weight_scale {tuple(scale.shape)} does not fit group {group} on {in_features} columns")
        check_static_groups(g_idx, group, in_features, what)
        try:
            codes = unpack_words(packed, bits, in_features, dense or 32 % bits == 0)
            if zp is None or w.get("symmetric"):
                zeros = torch.full(scale.shape, offset, dtype=torch.uint8)
                if zp is not None and bool((zp != 0).any()):
                    raise ValueError("symmetric weights with a non-zero zero-point")
            elif zp.dtype == torch.int32 and zp.shape[0] != scale.shape[0]:       # packed along the output dim
                zeros = unpack_words(zp.t().contiguous(), bits, scale.shape[0], dense or 32 % bits == 0).t()
            else:                                                                  # signed zero-points, unpacked
                zeros = (zp.reshape(scale.shape).to(torch.int16) + offset).to(torch.uint8)
        except ValueError as e:
            raise LowbitError(f"{what}: {e}") from None
        raw[name] = RawLinear(codes, fp16_scales(scale, what), zeros.contiguous(), bits, group,
                              bool(w.get("symmetric")))
        if f"{name}.bias" in tensors:
            biases[name] = tensors.pop(f"{name}.bias")
    quantized, notes = to_qtensors(raw)
    first = next(iter(groups.values()))["weights"]
    scheme = (f"compressed-tensors pack-quantized int{first['num_bits']} {first['strategy']}"
              f"{' ' + str(first['group_size']) if first['strategy'] == 'group' else ''} "
              f"{'sym' if first.get('symmetric') else 'asym'}{' (+ other groups)' if len(groups) > 1 else ''}")
    return Checkpoint(scheme, quantized, biases, tensors, tuple(notes))


# ------------------------------------------------------------------ the model

def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"cannot read {file}: {e}") from None
    return tensors


def load_imported(source):
    """A Loaded whose quantized linears are QuantLinears holding the checkpoint's codes and scales.
    Returns (loaded, checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import no_init_weights

    from ..nn.qlinear import QuantLinear
    from .load import Loaded, _sha256_dir, hf_config
    from .specs import ModelDims, spec_for

    path = source.path
    qc = quantization_config(path)
    reader = reader_for(qc)
    check(qc)                                        # refuse before any weight is read
    config = hf_config(path)
    del config.quantization_config                   # lowbit holds the quantization itself
    try:
        spec = spec_for(config.model_type)
    except ValueError as e:
        raise LowbitError(str(e)) from None
    with no_init_weights():                          # every weight comes from the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ckpt = reader(qc, read_tensors(path), shapes, path)
    if not ckpt.quantized:
        raise LowbitError(f"{path}: quantization_config says {qc.get('quant_method')}, but no quantized linear was found")
    if spec.head in ckpt.quantized and config.tie_word_embeddings:
        model.config.tie_word_embeddings = False     # the head has its own codes; the embedding stays float
    for name, q in ckpt.quantized.items():
        if shapes.get(name) != q.shape:
            raise LowbitError(f"{path}: quantized {name} is {q.shape}, the model's linear is {shapes.get(name)}")
        bias = ckpt.biases.get(name)
        if bias is not None and model.get_submodule(name).bias is None and not bool(bias.any()):
            bias = None                              # a zero bias written for a linear that has none
        model.set_submodule(name, QuantLinear(q, None if bias is None else bias.float()))
    missing, unexpected = model.load_state_dict(ckpt.floats, strict=False)
    if unexpected:
        raise LowbitError(f"{path}: unexpected tensors {unexpected[:3]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    missing = [k for k in missing if not isinstance(model.get_submodule(k.rsplit(".", 1)[0]), QuantLinear)
               and not (model.config.tie_word_embeddings and k == spec.head + ".weight")]
    if missing:
        raise LowbitError(f"{path}: missing tensors {missing[:3]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        if "TokenizersBackend" not in str(e):
            raise LowbitError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from e
        from transformers import PreTrainedTokenizerFast   # transformers 5's name for a plain tokenizer.json

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    loaded = Loaded(model.eval(), tokenizer, spec, ModelDims.from_config(model.config), source, _sha256_dir(path))
    return loaded, ckpt
