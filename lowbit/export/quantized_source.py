"""Read a lowbit quantized directory as tensors (no model is built) for the engine exporters."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from ..formats import Format, IntFormat, QTensor, format_from_dict
from ..formats.activation import act_format_from_dict
from ..models.registry import resolve

# files of a lowbit directory that every export carries over unchanged: the tokenizer lowbit
# built from the GGUF (tokenizer.json and its configs; sentencepiece models when present)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True, eq=False)
class QuantizedSource:
    """A lowbit directory: its config, the quantized linears and every other (float) tensor."""

    path: Path
    config: dict                       # config.json as a dict
    manifest: dict                     # lowbit.json
    quantized: dict[str, QTensor]      # module name -> QTensor
    biases: dict[str, object]          # module name -> bias tensor of a quantized linear
    floats: dict[str, object]          # state-dict key -> tensor (embeddings, norms, float linears)
    acts: dict = None                  # module name -> ActFormat of the linears whose inputs are quantized
    input_scales: dict = None          # module name -> calibrated input scale [1] (static activations)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def formats(self) -> list[Format]:
        """The distinct formats of the quantized linears."""
        seen = []
        for q in self.quantized.values():
            if q.fmt not in seen:
                seen.append(q.fmt)
        return seen


def read_quantized(src: str, target: str) -> QuantizedSource:
    """Load the tensors of the lowbit directory `src`; LowbitError if `src` is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .lowbit_dir import MANIFEST, WEIGHTS, read_manifest

    source = resolve(src)
    if source.kind != "lowbit":
        raise LowbitError(f"--format {target} exports a lowbit quantized directory (from `lowbit quantize`), "
                          f"but {src} is a {source.kind} model")
    path = source.path
    manifest = read_manifest(path)
    config = json.loads((path / "config.json").read_text())
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LowbitError(f"cannot read {path / WEIGHTS}: {e}") from None
    quantized, biases, acts, input_scales = {}, {}, {}, {}
    if manifest.get("method", {}).get("kv_cache"):
        raise LowbitError(f"{src} quantizes its KV cache (lowbit's simulated quantizer); --format {target} "
                          "would not carry it (refused)")
    online = [n for n, e in manifest["tensors"].items() if e.get("input_transform") or e.get("output_transform")]
    if online:
        raise LowbitError(f"{src}: {len(online)} linears rotate their input or output online (first: {online[0]}); "
                          f"--format {target} has no place for an online rotation, so the export would compute "
                          "a different model (refused)")
    sparse = [n for n, e in manifest["tensors"].items() if e.get("outliers")]
    if sparse:
        raise LowbitError(f"{src}: {len(sparse)} linears keep dense-and-sparse outliers (first: {sparse[0]}); "
                          f"--format {target} has no place for the float16 part (refused; quantize without "
                          "--outliers to export)")
    for name, entry in manifest["tensors"].items():
        if "activations" in entry:
            acts[name] = act_format_from_dict(entry["activations"])
            if f"{name}.input_scale" in tensors:
                input_scales[name] = tensors.pop(f"{name}.input_scale")
        fmt = format_from_dict(entry["format"])
        parts = {k: tensors.pop(f"{name}.{k}") for k in ("codes", "scales", "zeros") if f"{name}.{k}" in tensors}
        try:
            quantized[name] = fmt.unpack(parts, tuple(entry["shape"]))
        except ValueError as e:
            raise LowbitError(f"{path / WEIGHTS}: tensor {name} does not match {MANIFEST}: {e}") from None
        if f"{name}.bias" in tensors:
            biases[name] = tensors.pop(f"{name}.bias")
    return QuantizedSource(path, config, manifest, quantized, biases, tensors, acts, input_scales)


def int_formats(source: QuantizedSource, target: str, bits: tuple[int, ...]) -> list[IntFormat]:
    """Every integer format of the quantized linears (a plan may mix them), or a LowbitError saying why
    one cannot be exported."""
    formats = source.formats()
    if not formats:
        raise LowbitError(f"{source.path} has no quantized linear")
    for fmt in formats:
        if not isinstance(fmt, IntFormat):
            raise LowbitError(f"--format {target} stores uniform integer codes; {fmt.name} ({fmt.family}: "
                              "non-uniform levels or float elements) has no representation there")
        if fmt.bits not in bits:
            raise LowbitError(f"--format {target} takes {'/'.join(map(str, bits))}-bit integers, not {fmt.bits}-bit "
                              f"({fmt.name})")
    return formats


def single_int_format(source: QuantizedSource, target: str, bits: tuple[int, ...]) -> IntFormat:
    """The one integer format of all quantized linears, or a LowbitError saying why it cannot be exported."""
    formats = source.formats()
    if not formats:
        raise LowbitError(f"{source.path} has no quantized linear")
    if len(formats) > 1:
        raise LowbitError(f"--format {target} writes one scheme for all linears; {source.path} mixes "
                          f"{', '.join(f.name for f in formats)}")
    fmt = formats[0]
    if not isinstance(fmt, IntFormat):
        raise LowbitError(f"--format {target} stores uniform integer codes; {fmt.name} ({fmt.family}: "
                          "non-uniform levels or float elements) has no representation there")
    if fmt.bits not in bits:
        raise LowbitError(f"--format {target} takes {'/'.join(map(str, bits))}-bit integers, not {fmt.bits}-bit")
    return fmt


def linear_names(config: dict) -> list[str]:
    """Every nn.Linear of the architecture (built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config))
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def copy_tokenizer(src_dir: Path, out: Path, config: dict) -> None:
    """Copy the tokenizer files and write generation_config.json from the model config."""
    from transformers import GenerationConfig

    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out / name)
    GenerationConfig.from_model_config(hf_config(config)).save_pretrained(out)


def hf_config(config: dict):
    """The transformers config object of a config.json dict."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def write_config(out: Path, config: dict, quantization_config: dict | None) -> None:
    """config.json: the source's config, plus `quantization_config` when given."""
    config = dict(config)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
