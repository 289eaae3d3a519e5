"""Models larger than memory: the model's skeleton without its weights, each decoder layer's weights
read from the safetensors files (or a GGUF: lazy_gguf.py) when the walk reaches it and dropped after.

`load_lazy` builds the transformers model with every parameter on the meta device (buffers such as
RoPE's inverse frequencies stay real), then reads only the embedding and the final norm. The walker
(through quantize's layer_io) materializes one layer in float32, and once it is quantized and
written, moves it back to meta. The LM head is read when it is needed. Tensors are read one at a
time with plain reads, so the transient is one tensor, and no mapped file pages stay resident.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from .registry import ModelSource

INDEX = "model.safetensors.index.json"


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    """One safetensors file read tensor by tensor with plain reads, not a memory map: a mapped file's pages
    would stay resident (and count in RSS) as the walk goes through it. The header is checked whole
    before anything is read: every tensor's span inside the file, of the size its dtype and shape say."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise LowbitError(f"{self.path}: not a safetensors file (header length {n})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError):
                raise LowbitError(f"{self.path}: the safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise LowbitError(f"{self.path}: the safetensors header is not an object")
        self.base, self.entries = 8 + n, {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
                count = 1
                for d in shape:
                    if not isinstance(d, int) or d < 0:
                        raise ValueError("shape")
                    count *= d
                if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                        and self.base + end <= size and end - begin == count * dtype.itemsize):
                    raise ValueError("offsets")
            except (KeyError, TypeError, ValueError):
                raise LowbitError(f"{self.path}: tensor {str(name)[:60]!r} has a bad entry (dtype among "
                                  f"{', '.join(DTYPES)}, shape, offsets inside the file)") from None
            self.entries[name] = (dtype, shape, begin, end)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            if f.readinto(buf) != len(buf):
                raise LowbitError(f"{self.path}: {name} is cut short")
        if not buf:
            return torch.empty(shape, dtype=torch.float32)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape).to(torch.float32)


def index_files(path: Path) -> list[str]:
    """The shard files a directory's INDEX names, each checked to be a plain file inside `path`."""
    try:
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LowbitError(f"{path / INDEX}: unreadable ({type(e).__name__})") from None
    bad = [f for f in files if not isinstance(f, str) or "/" in f or "\\" in f or not (path / f).is_file()]
    if bad:
        raise LowbitError(f"{path / INDEX} names {str(bad[0])[:80]!r}, which is not a file of {path}")
    return files


class SafetensorsWeights:
    """The tensors of a Hugging Face directory (model.safetensors or shards named by the index),
    read one at a time as float32."""

    def __init__(self, path: Path):
        path = Path(path)
        if (path / INDEX).is_file():
            files = index_files(path)
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise LowbitError(f"{path}: no model.safetensors or {INDEX} (lazy loading reads safetensors)")
        self._where: dict[str, SafetensorsFile] = {}
        for name in files:
            file = SafetensorsFile(path / name)
            for key in file.entries:
                self._where[key] = file

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """One tensor as float32."""
        if name not in self._where:
            raise LowbitError(f"the model's files lack {name}")
        return self._where[name].get(name)


def materialize(module: nn.Module, prefix: str, weights: SafetensorsWeights) -> None:
    """Give every meta parameter of `module` its float32 value from `weights` (names prefix + local name)."""
    for name, param in list(module.named_parameters()):
        if not param.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = weights.get(prefix + name)
        if tuple(value.shape) != tuple(param.shape):
            raise LowbitError(f"{prefix + name}: the file holds {list(value.shape)}, the config says {list(param.shape)}")
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def release(module: nn.Module) -> None:
    """Drop `module`'s tensors (parameters and buffers to meta): the walk is done with it. glibc keeps
    freed blocks under its mmap threshold (which grows to 32 MB) in the heap, so the freed layer is
    also handed back to the system (malloc_trim) or RSS would climb layer after layer."""
    module.to("meta")
    _trim()


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)                    # not glibc: its allocator returns memory its own way


def _map_large_allocations() -> None:
    """glibc: serve every allocation of 1 MiB or more by its own mapping, unmapped when freed. By default
    the threshold follows the largest block freed so far, after which a layer's tensors come from the
    heap and its address space only grows (counted by RLIMIT_DATA), layer after layer."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)              # M_MMAP_THRESHOLD; setting it also stops the adjustment


def _skeleton(config, layers: str) -> nn.Module:
    """The model with every tensor on meta, then its buffers (RoPE's inverse frequencies: computed in
    __init__, not stored) taken from a one-layer copy built on the CPU with its parameters on meta; the
    full model's parameters are never allocated, not even for a moment."""
    import copy
    import re

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if getattr(small, "layer_types", None):
        small.layer_types = small.layer_types[:1]
    with init_empty_weights(include_buffers=False):
        reference = dict(AutoModelForCausalLM.from_config(small, dtype=torch.float32).named_buffers())
    for name, _ in list(model.named_buffers()):
        key = re.sub(rf"^{re.escape(layers)}\.\d+\.", f"{layers}.0.", name)    # every layer's like layer 0's
        if key not in reference:
            raise LowbitError(f"{config.model_type}: buffer {name} has no counterpart to compute it from")
        owner_name, _, leaf = name.rpartition(".")
        model.get_submodule(owner_name)._buffers[leaf] = reference[key].clone()
    return model


def load_lazy(source: ModelSource):
    """A Loaded whose decoder layers and head have no weights yet; `Loaded.weights` reads them (from a
    Hugging Face directory of safetensors, or a GGUF de-quantized tensor by tensor: models/lazy_gguf.py)."""
    from transformers import AutoTokenizer

    from .load import Loaded, _sha256_dir, hf_config, sha256_file
    from .specs import ModelDims, spec_for

    if source.kind == "gguf":
        from transformers import AutoConfig

        from .gguf_check import check_gguf
        from .lazy_gguf import GGUFWeights
        from .tokenizer import tokenizer_from_gguf

        check_gguf(source.path)          # a corrupted or truncated file: one clear line, before any parser trusts it
        try:
            config = AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        except Exception as e:           # transformers' GGUF reader raises assorted errors on files it cannot map
            raise LowbitError(f"transformers cannot read the config of {source.path.name}: {type(e).__name__}") from None
        weights, tokenizer, sha = GGUFWeights(source.path, config), tokenizer_from_gguf(source.path), \
            sha256_file(source.path)
    elif source.kind == "hf":
        weights, config = SafetensorsWeights(source.path), hf_config(source.path)
        tokenizer, sha = AutoTokenizer.from_pretrained(str(source.path)), _sha256_dir(source.path)
    else:
        raise LowbitError(f"--lazy reads a Hugging Face directory of safetensors or a GGUF; {source.arg} is a "
                          f"{source.kind} source")
    _map_large_allocations()
    try:
        spec = spec_for(config.model_type)
    except ValueError as e:
        raise LowbitError(str(e)) from None
    model = _skeleton(config, spec.layers)
    model.eval()
    if not getattr(config, "architectures", None):      # a GGUF's config: named as the in-memory path saves it
        config.architectures = [type(model).__name__]
    for name in (spec.embed, spec.final_norm):
        materialize(model.get_submodule(name), name + ".", weights)
    if config.tie_word_embeddings:
        model.tie_weights()
    return Loaded(model, tokenizer, spec, ModelDims.from_config(config), source, sha, weights=weights)
