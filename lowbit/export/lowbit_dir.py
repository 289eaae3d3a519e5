"""lowbit's own checkpoint: packed codes + scales + zero-points in safetensors, plus lowbit.json.

Layout of DIR:
  config.json, tokenizer files      as transformers writes them
  model.safetensors                 float tensors that were not quantized (embeddings, norms, …)
                                    and, per quantized linear NAME: NAME.codes (bit-packed uint8),
                                    NAME.scales, NAME.zeros (asymmetric only), NAME.bias if any
  lowbit.json                       format per tensor, method, versions, source model and sha256
The directory is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import LowbitError
from ..models.lazy import INDEX, index_files  # noqa: F401 (INDEX: a streamed directory's shards)
from ..models.load import Loaded, sha256_file
from ..models.registry import ModelSource
from ..models.specs import ModelDims, spec_for
from ..nn.qlinear import QuantLinear
from ..nn.qstate import BAD_ENTRY, pack_linear, quantized_module
from ..nn.qweight import HOLDER, attach_quantized_weight, quantized_weights

WEIGHTS = "model.safetensors"
MANIFEST = "lowbit.json"
SCHEMA = 1


def _state(loaded: Loaded, exclude: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Split the model into stored tensors and the manifest entry of each quantized linear; names
    starting with `exclude` (the decoder layers a stream has written) left out."""
    model = loaded.model
    keep = (lambda n: True) if exclude is None else (lambda n: not n.startswith(exclude))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and keep(n)}
    tensors, entries = {}, {}
    for name, module in quantized.items():
        entries[name] = pack_linear(name, module, tensors)
    holders = quantized_weights(model)
    for name, holder in holders.items():        # non-linear weights (a GGUF mix's embedding)
        for key, t in holder.fmt.pack(holder.qtensor).items():
            tensors[f"{name}.{key}"] = t.contiguous()
        shape = (holder.out_features, holder.in_features)
        entries[name] = {"format": holder.fmt.to_dict(), "shape": list(shape), "bits": holder.fmt.storage_bits(shape),
                         "kind": "weight"}
    tied_head = loaded.spec.head + ".weight" if model.config.tie_word_embeddings else None
    for key, t in model.state_dict().items():
        if not keep(key):
            continue
        owner = key.rsplit(".", 1)[0]
        if owner in quantized and not key.endswith(".bias"):
            continue                              # codes/scales/zeros (and input_scale) stored above
        if key.endswith(f".{HOLDER}.codes") or key.endswith(f".{HOLDER}.scales") or key.endswith(f".{HOLDER}.zeros") \
                or (owner in holders and key.endswith(".weight")):
            continue                              # stored packed above; the weight is W_dq of them
        if key == tied_head:
            continue                              # the embedding carries it; re-tied on load
        tensors[key] = t.detach().contiguous()
    return tensors, entries


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before any slow work when `out` cannot become a lowbit directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"--out {out} already exists and is not empty (pass --overwrite to replace it)")


def save_quantized(loaded: Loaded, method: dict, out: Path, overwrite: bool = False) -> Path:
    """Write the quantized model to `out` atomically; returns `out`."""
    out = Path(out)
    check_out(out, overwrite)
    tensors, entries = _state(loaded)
    manifest = _manifest(loaded, method, entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        loaded.model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        # one metadata key: safetensors writes its metadata map in hash order, so two keys made two runs'
        # bytes differ (lowbit's version is in lowbit.json)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out` (replacing what --overwrite allowed)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _manifest(loaded: Loaded, method: dict, entries: dict) -> dict:
    return {
        "schema": SCHEMA,
        "lowbit": __version__,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
        "method": method,
        "source": {"arg": loaded.source.arg, "name": loaded.source.name, "kind": loaded.source.kind,
                   "path": str(loaded.source.path), "sha256": loaded.sha256},
        "tensors": entries,
    }


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path}/{MANIFEST} is missing or not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise LowbitError(f"{path}/{MANIFEST} is not a JSON object")
    if manifest.get("schema") != SCHEMA:
        raise LowbitError(f"{path}/{MANIFEST} has schema {str(manifest.get('schema'))[:40]!r}; this lowbit reads {SCHEMA}")
    if not isinstance(manifest.get("tensors"), dict) or not all(isinstance(e, dict) for e in manifest["tensors"].values()):
        raise LowbitError(f"{path}/{MANIFEST}: \"tensors\" must map each tensor name to an object")
    if not isinstance(manifest.get("method", {}), dict):
        raise LowbitError(f"{path}/{MANIFEST}: \"method\" must be an object")
    return manifest


def load_quantized(source: ModelSource) -> Loaded:
    """Rebuild a model saved by save_quantized, with QuantLinear modules in place."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import no_init_weights

    path = source.path
    manifest = read_manifest(path)
    tensors = _read_tensors(path)
    config = AutoConfig.from_pretrained(str(path))
    with no_init_weights():                      # every weight comes from the file below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = {}
    for name, entry in manifest["tensors"].items():
        try:
            kind, q = quantized_module(name, entry, tensors)
            if kind == "linear":
                model.get_submodule(name)                                   # a name the model has
                model.set_submodule(name, q)
            else:
                weights[name] = q
        except BAD_ENTRY as e:
            raise LowbitError(f"{path / MANIFEST}: tensor {name[:60]!r} does not match the model or "
                              f"{WEIGHTS}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:                    # a float tensor of the wrong shape
        raise LowbitError(f"{path / WEIGHTS}: {str(e).splitlines()[-1].strip()[:300]}") from None
    if unexpected:
        raise LowbitError(f"{path / WEIGHTS}: unexpected tensors {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, q in weights.items():
        try:
            attach_quantized_weight(model.get_submodule(name), q)
        except BAD_ENTRY as e:
            raise LowbitError(f"{path / MANIFEST}: tensor {name[:60]!r}: {type(e).__name__}: {e}") from None
    missing = [k for k in missing if not _is_derived(model, k) and k.rsplit(".", 1)[0] not in weights]
    if missing:
        raise LowbitError(f"{path / WEIGHTS}: missing tensors {missing[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    try:
        spec = spec_for(config.model_type)
    except ValueError as e:
        raise LowbitError(str(e)) from None
    kv = manifest.get("method", {}).get("kv_cache")
    if kv:
        from ..nn.kv_attention import KvQuant, install_kv_quant

        try:
            install_kv_quant(model, spec, KvQuant.from_dict(kv))
        except BAD_ENTRY as e:
            raise LowbitError(f"{path / MANIFEST}: method.kv_cache: {type(e).__name__}: {e}") from None
    weights = [path / WEIGHTS] if (path / WEIGHTS).is_file() else [path / f for f in index_files(path)]
    sha = sha256_file(weights[0]) if len(weights) == 1 else \
        hashlib.sha256("".join(sha256_file(f) for f in weights).encode()).hexdigest()
    return Loaded(model.eval(), tokenizer, spec, ModelDims.from_config(config), source, sha)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards of a directory written layer by layer (INDEX)."""
    files = [WEIGHTS] if (path / WEIGHTS).is_file() or not (path / INDEX).is_file() else index_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(str(path / name))
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"cannot read {path / name}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        if set(part) & set(tensors):
            raise LowbitError(f"{path / name} repeats tensors of another shard: {sorted(set(part) & set(tensors))[:2]}")
        tensors.update(part)
    return tensors


def _is_derived(model: torch.nn.Module, key: str) -> bool:
    """State-dict keys that need no file entry: QuantLinear state (loaded above), tied heads."""
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    if isinstance(owner, QuantLinear):
        return True
    return bool(model.config.tie_word_embeddings) and key.endswith("lm_head.weight")
