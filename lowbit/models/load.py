"""Load a resolved model as a float32 transformers model plus its tokenizer and spec.

GGUF files are de-quantized by transformers once and cached as safetensors under
`cache_dir()/float/<sha256[:16]>`, so later loads read plain float tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from ..log import logger
from ..paths import cache_dir
from .registry import ModelSource, resolve
from .specs import ArchSpec, ModelDims, spec_for


@dataclass
class Loaded:
    """A model ready to quantize or evaluate. `model` is mutable by design (quantization edits it)."""

    model: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    dims: ModelDims
    source: ModelSource
    sha256: str                  # of the source file (GGUF) or of the directory's lowbit.json / weights
    weights: object = None       # models.lazy.SafetensorsWeights when the layers are read on demand (load_lazy)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_dir(path: Path) -> str:
    """Hash of a model directory: its config and safetensors files, in name order."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir) and rename tmp_dir to `final`; nothing half-written is left behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    try:
        write(tmp)
        if final.exists():                      # another process won the race: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _float_cache(source: ModelSource, sha: str) -> Path:
    """The de-quantized float32 copy of a GGUF, written on first use."""
    from transformers import AutoModelForCausalLM

    from .tokenizer import tokenizer_from_gguf

    final = cache_dir() / "float" / sha[:16]
    if (final / "config.json").is_file():
        return final

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        logger.info("de-quantizing %s to float32 (once; cached in %s)", source.path.name, final)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32, output_loading_info=True)
        except Exception as e:  # transformers' GGUF loader raises assorted errors on files it cannot map
            raise LowbitError(f"transformers cannot load {source.path.name}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        # a tensor the file lacks (or names wrongly) would be left at random initialization
        missing = [k for k in info["missing_keys"] if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
        if missing:
            raise LowbitError(f"{source.path.name} lacks {len(missing)} of the model's tensors "
                              f"(e.g. {', '.join(missing[:2])}): not loaded")
        model.save_pretrained(tmp)
        tokenizer_from_gguf(source.path).save_pretrained(tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps(
            {"gguf": str(source.path), "sha256": sha}, indent=1))
        logger.info("cached float model in %.1f s", time.perf_counter() - start)

    return _atomic_dir(final, write)


def hf_config(path: Path):
    """A directory's transformers config, with the RoPE settings transformers 5 writes under
    `rope_parameters` (which this transformers 4 ignores, silently falling back to its default base)
    copied to the fields it reads: `rope_theta` / `rope_scaling`, and Gemma 3's per-attention-type
    pair (`full_attention` → rope_theta, `sliding_attention` → rope_local_base_freq)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        if isinstance(rope.get("full_attention"), dict):
            config.rope_theta = rope["full_attention"].get("rope_theta", config.rope_theta)
            if isinstance(rope.get("sliding_attention"), dict) and "rope_theta" in rope["sliding_attention"]:
                config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        else:
            if "rope_theta" in rope:
                config.rope_theta = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def load_float_dir(path: Path):
    """(model, tokenizer) from a Hugging Face directory, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), config=hf_config(path), dtype=torch.float32,
                                                           output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # a missing, truncated or lying file
        raise LowbitError(f"cannot load model from {path}: {(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None
    # a tensor the files lack (or name wrongly) would be left at random initialization
    missing = [k for k in info["missing_keys"] if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise LowbitError(f"{path} lacks {len(missing)} of the model's tensors (e.g. {', '.join(missing[:2])}): not loaded")
    return model.eval(), tokenizer


def load(arg: str | ModelSource) -> Loaded:
    """Load a model argument (name, .gguf, HF dir or lowbit dir) as a Loaded model."""
    source = arg if isinstance(arg, ModelSource) else resolve(arg)
    if source.kind == "lowbit":
        from ..export.lowbit_dir import load_quantized

        return load_quantized(source)
    if source.kind == "gguf":
        from .gguf_check import check_gguf

        check_gguf(source.path)  # a corrupted or truncated file: one clear line, before any parser trusts it
        sha = sha256_file(source.path)
        model, tokenizer = load_float_dir(_float_cache(source, sha))
    else:
        from .imported import load_imported, quantization_config

        if quantization_config(source.path) is not None:   # GPTQ / AWQ / compressed-tensors checkpoint
            return load_imported(source)[0]
        sha = _sha256_dir(source.path)
        model, tokenizer = load_float_dir(source.path)
    try:
        spec = spec_for(model.config.model_type)
    except ValueError as e:
        raise LowbitError(str(e)) from None
    return Loaded(model, tokenizer, spec, ModelDims.from_config(model.config), source, sha)
