"""write_gguf: a model's tensors as one GGUF file. It writes; it never re-rounds.

Per tensor: the HF parameter is renamed (and q/k rows permuted, Gemma norms shifted) as llama.cpp's
converter does (models/gguf_names.py), then stored as it is held:
  * a weight quantized to a GGUF type (QuantLinear or an embedding's QuantWeight): its blocks'
    bytes, byte for byte (q/k: whole block rows permuted, which moves no value);
  * a weight quantized to an integer grid some GGUF type holds exactly (export/gguf/lossless.py:
    Q4_0/Q5_0/Q8_0 bit-exact, Q4_1/Q5_1 up to the fp16 rounding of the minimum): re-expressed;
  * a float tensor: F32;
  * any other quantized format: refused with the reason, unless `requantize` names a llama.cpp
    mix, which re-rounds every tensor from its de-quantized values (the explicit, lossy way).
The file is written to a temporary sibling and renamed into place, so nothing is left at
`out_path` on error; the source is only read.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import LowbitError
from ...formats import GGUFFormat
from ...formats.gguf import quantize_gguf
from ...log import logger
from ...models.gguf_names import family_for, gguf_name, gguf_tensor, permute_rotary_rows
from ...nn.qlinear import QuantLinear
from ...nn.qweight import quantized_weights
from ...plans.gguf_mixes import mix as get_mix
from ...plans.gguf_mixes import tensor_type
from .lossless import encode_lossless

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as written: GGUF name, type, shape [rows, row_length] (PyTorch order), stored bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    nbytes: int

    def __post_init__(self):
        if self.nbytes <= 0 or not self.shape:
            raise ValueError(f"TensorRecord {self.name}: empty tensor")

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.params


@dataclass(frozen=True)
class GGUFSummary:
    """What write_gguf wrote: the mix, every tensor, and the file's bits per weight (tensor data only)."""

    path: Path
    mix: str
    tensors: tuple[TensorRecord, ...]
    metadata_from: str
    max_error: float = 0.0          # largest |written - lowbit's W_dq| (Q4_1/Q5_1 minima; else 0)

    @property
    def dominant_type(self) -> str:
        """The quantized type holding the most weights (F32 when none is quantized)."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            if t.type_name not in ("F32", "F16"):
                counts[t.type_name] = counts.get(t.type_name, 0) + t.params
        return max(counts, key=counts.get) if counts else "F32"

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(t.nbytes for t in self.tensors) / self.params

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts


# general.file_type (llama.cpp's LlamaFileType) by the type most of the file's weights have
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
             "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25}


def stored_tensors(model) -> dict[str, object]:
    """{HF parameter name: QTensor or float tensor} of everything `model` stores, a tied head once."""
    holders = {f"{name}.weight": h.qtensor for name, h in quantized_weights(model).items()}
    linears = {f"{name}.weight": m.qtensor for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for key, value in model.state_dict().items():
        if ".qweight." in key or key.endswith(".W_dq") or key.endswith((".codes", ".scales", ".zeros")):
            continue
        out[key] = holders.get(key, linears.get(key, value))
    for key, q in linears.items():
        out.setdefault(key, q)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # tied: llama.cpp reads the output from token_embd
    return out


def encode_stored(hf_name: str, value, family, n_heads: int, n_kv: int) -> tuple[str, np.ndarray, float]:
    """(GGUF type, array GGUFWriter stores, max abs error vs lowbit's W_dq) of one stored tensor."""
    from ...formats import QTensor

    if not isinstance(value, QTensor):
        return "F32", gguf_tensor(hf_name, value, family, n_heads, n_kv).numpy(), 0.0
    if isinstance(value.fmt, GGUFFormat):
        type_name, data, err = value.fmt.type_name, value.codes.numpy(), 0.0
    else:
        try:
            type_name, data, err = encode_lossless(value)
        except ValueError as e:
            raise LowbitError(f"{hf_name}: {e}") from None
    heads = n_heads if hf_name.endswith("q_proj.weight") else n_kv if hf_name.endswith("k_proj.weight") else 0
    if family.permute_qk and heads:
        data = permute_rotary_rows(torch.from_numpy(np.ascontiguousarray(data)), heads).numpy()  # rows of blocks
    return type_name, np.ascontiguousarray(data), err


def metadata_source(loaded) -> Path | None:
    """The GGUF whose key/values the export copies: the source itself, or the GGUF a lowbit directory
    was quantized from; None when the model came from a Hugging Face directory."""
    if loaded.source.kind == "gguf":
        return loaded.source.path
    if loaded.source.kind == "lowbit":
        from ..lowbit_dir import read_manifest

        origin = read_manifest(loaded.source.path)["source"]
        if origin.get("kind") == "gguf" and Path(origin["path"]).is_file():
            return Path(origin["path"])
    return None


def write_gguf(loaded_or_source, out_path, requantize: str | None = None, label: str | None = None) -> GGUFSummary:
    """Write the model at `out_path` as stored (see the module doc); returns what was written.

    requantize: a llama.cpp mix (Q4_K_M, Q8_0, F16, ...) to re-round every tensor to from its
    de-quantized values instead (lowbit's GGUF quantizers, no imatrix). label: the summary's name
    for the mix (default: the lowbit directory's plan, or the dominant type)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from ...formats import QTensor
    from ...models.load import Loaded, load
    from .metadata import copy_source_metadata, write_hf_metadata

    loaded = loaded_or_source if isinstance(loaded_or_source, Loaded) else load(str(loaded_or_source))
    sparse = [n for n, m in loaded.model.named_modules() if "outlier_index" in getattr(m, "_buffers", {})]
    if sparse:
        from ...errors import LowbitError

        raise LowbitError(f"{len(sparse)} linears keep dense-and-sparse outliers (first: {sparse[0]}); a GGUF file "
                          "has no place for their float16 part (refused; quantize without --outliers to export)")
    the_mix = None if requantize is None else get_mix(requantize)
    out_path = Path(out_path)
    config = loaded.model.config
    family = family_for(config.model_type)
    state = stored_tensors(loaded.model)
    n_layers, n_heads, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    has_output = "lm_head.weight" in state
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the finished file gets the usual permissions
    try:
        records, worst = [], 0.0
        encoded = []
        for hf_name, value in tqdm(state.items(), desc="gguf", unit="tensor", leave=False):
            name, layer = gguf_name(hf_name, family)
            if the_mix is None:
                type_name, data, err = encode_stored(hf_name, value, family, n_heads, n_kv)
                worst = max(worst, err)
            else:
                W = value.fmt.dequantize(value) if isinstance(value, QTensor) else value
                W = gguf_tensor(hf_name, W, family, n_heads, n_kv)
                type_name = tensor_type(the_mix.name, name, tuple(W.shape), layer, n_layers, n_gqa=n_heads // n_kv,
                                        has_output=has_output)
                data = W.numpy().astype(np.float16 if type_name == "F16" else np.float32) \
                    if type_name in ("F32", "F16") else quantize_gguf(W, type_name)
            shape = tuple(value.shape)
            encoded.append((name, data, type_name))
            records.append(TensorRecord(name, type_name, shape, int(data.nbytes)))
        summary = GGUFSummary(out_path, label or _label(loaded, the_mix, records), tuple(records), "", worst)
        writer = GGUFWriter(tmp, family.arch)
        origin = metadata_source(loaded)
        if origin is not None:
            copy_source_metadata(writer, origin)
            metadata_from = f"source GGUF {origin.name}"
        else:
            write_hf_metadata(writer, family.arch, config, loaded.tokenizer, loaded.source.path.name)
            metadata_from = "HF config and tokenizer"
        from ...plans.gguf_mixes import MIXES

        file_type = MIXES[summary.mix].file_type if summary.mix in MIXES else FILE_TYPE.get(summary.dominant_type, 0)
        writer.add_file_type(file_type)
        writer.add_quantization_version(QUANTIZATION_VERSION)
        for name, data, type_name in encoded:
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    summary = GGUFSummary(out_path, summary.mix, summary.tensors, metadata_from, worst)
    logger.info("wrote %s: %s, %d tensors, %.3f bits/weight", out_path, summary.mix, len(records),
                summary.bits_per_weight)
    return summary


def _label(loaded, the_mix, records) -> str:
    """The mix a file is: the requantize mix, the lowbit directory's plan origin, or its types."""
    if the_mix is not None:
        return the_mix.name
    if loaded.source.kind == "lowbit":
        from ..lowbit_dir import read_manifest

        plan = read_manifest(loaded.source.path)["method"].get("plan")
        if plan and plan.get("origin", "").startswith("gguf mix "):
            return plan["origin"][len("gguf mix "):]
    counts: dict[str, int] = {}
    for r in records:
        counts[r.type_name] = counts.get(r.type_name, 0) + r.params
    return "mostly " + max(counts, key=counts.get)
