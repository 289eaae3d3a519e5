"""write_gguf: a model (any lowbit model argument) as a GGUF file of one llama.cpp mix.

Per tensor: the HF parameter is renamed and transformed as llama.cpp's converter does (names.py),
its type chosen as llama.cpp's quantizer would (mixes.py), and its bytes made by lowbit's own
GGUF quantizers (lowbit.formats.gguf). The file is written to a temporary sibling and renamed
into place, so nothing is left at `out_path` on error; the source is only read.
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
from ...formats.gguf import gguf_type, quantize_gguf
from ...log import logger
from ...methods.gptq_gguf import gptq_gguf
from .mixes import mix as get_mix
from .mixes import tensor_type
from .names import family_for, gguf_name, gguf_tensor

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


def encode_tensor(value: torch.Tensor, type_name: str, imatrix=None, hessian=None) -> np.ndarray:
    """float32 values -> the array GGUFWriter stores: float32/float16 as is, else quantized bytes
    (with GPTQ error compensation when a Hessian is given and the type is a uniform grid)."""
    if type_name == "F32":
        return value.numpy().astype(np.float32, copy=False)
    if type_name == "F16":
        return value.numpy().astype(np.float16)
    if hessian is not None and gguf_type(type_name).set_codes is not None:
        data, _ = gptq_gguf(value, hessian, type_name, imatrix=imatrix)
        return data
    return quantize_gguf(value, type_name, imatrix=imatrix)


def _float_model(loaded):
    """The model with any lowbit QuantLinear replaced by its de-quantized weight (what it computes with)."""
    from ..hf import dequantized_linears

    dequantized_linears(loaded.model)
    return loaded.model


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


def write_gguf(loaded_or_source, mix: str, out_path, imatrix: dict | None = None,
               hessians: dict | None = None) -> GGUFSummary:
    """Write the model as a GGUF of mix `mix` (F32, F16, Q8_0, Q4_K_M, ...) at `out_path`.

    imatrix: {GGUF tensor name: [row_length] mean of x^2} used by the quantizers where present.
    hessians: {GGUF tensor name: H [row_length, row_length]}: those tensors are quantized by GPTQ
    on their GGUF grid (methods/gptq_gguf.py); the others (embeddings) as without.
    A Loaded passed in has its QuantLinears (if any) replaced by their de-quantized nn.Linear; files
    are only read.
    """
    from gguf import GGMLQuantizationType, GGUFWriter

    from ...models.load import Loaded, load
    from .metadata import copy_source_metadata, write_hf_metadata

    the_mix = get_mix(mix)
    loaded = loaded_or_source if isinstance(loaded_or_source, Loaded) else load(str(loaded_or_source))
    out_path = Path(out_path)
    config = loaded.model.config
    family = family_for(config.model_type)
    model = _float_model(loaded)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: llama.cpp reads the output from token_embd
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
        writer = GGUFWriter(tmp, family.arch)
        origin = metadata_source(loaded)
        if origin is not None:
            copy_source_metadata(writer, origin)
            metadata_from = f"source GGUF {origin.name}"
        else:
            write_hf_metadata(writer, family.arch, config, loaded.tokenizer, loaded.source.path.name)
            metadata_from = "HF config and tokenizer"
        writer.add_file_type(the_mix.file_type)
        writer.add_quantization_version(QUANTIZATION_VERSION)
        records = []
        for hf_name, param in tqdm(state.items(), desc=f"gguf {the_mix.name}", unit="tensor", leave=False):
            name, layer = gguf_name(hf_name, family)
            value = gguf_tensor(hf_name, param, family, n_heads, n_kv)
            shape = tuple(value.shape)
            type_name = tensor_type(the_mix.name, name, shape, layer, n_layers, n_gqa=n_heads // n_kv,
                                    has_output=has_output)
            weights = None if imatrix is None else imatrix.get(name)
            if weights is not None and np.shape(weights) != (shape[-1],):
                raise LowbitError(f"imatrix entry {name} has shape {np.shape(weights)}, the tensor's rows have "
                                  f"{shape[-1]} columns (an imatrix of another model?)")
            data = encode_tensor(value, type_name, weights, None if hessians is None else hessians.get(name))
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
            records.append(TensorRecord(name, type_name, shape, int(data.nbytes)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    summary = GGUFSummary(out_path, the_mix.name, tuple(records), metadata_from)
    logger.info("wrote %s: %s, %d tensors, %.3f bits/weight", out_path, the_mix.name, len(records),
                summary.bits_per_weight)
    return summary
