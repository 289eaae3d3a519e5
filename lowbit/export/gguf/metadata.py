"""GGUF key/values: copied from the source GGUF, or written from an HF config + tokenizer the way
llama.cpp's converter writes them (hyper-parameters per family; the vocabulary in vocab.py).

Keys describing the file itself (GGUF.*, general.architecture, general.file_type,
general.quantization_version) are never copied; the writer sets them for the file it writes.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter

from ...errors import LowbitError
from .vocab import write_vocab

NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version")


def _field_value(field):
    """A reader field's value in the form GGUFWriter.add_key_value takes (strings as raw bytes)."""
    main = field.types[0]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data]
        if field.types[-1] == GGUFValueType.ARRAY:
            raise LowbitError(f"GGUF key {field.name}: nested arrays are not supported")
        return [p.tolist()[0] for p in (field.parts[i] for i in field.data)]
    return field.parts[field.data[0]].tolist()[0]


def copy_source_metadata(writer: GGUFWriter, source: Path) -> int:
    """Copy every key/value of the GGUF at `source` but the per-file ones; returns how many."""
    try:
        reader = GGUFReader(str(source))
    except Exception as e:  # gguf raises assorted errors on bad files
        raise LowbitError(f"cannot read GGUF {source}: {type(e).__name__}: {e}") from None
    copied = 0
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in NOT_COPIED:
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, _field_value(field), field.types[0], sub_type)
        copied += 1
    return copied


def _hparams(writer: GGUFWriter, arch: str, config) -> None:
    """The hyper-parameters llama.cpp's converter writes for Llama, Qwen2 and Gemma 3."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = (rope.get("full_attention", rope) or {}).get("rope_theta") or getattr(config, "rope_theta", None)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)


def write_hf_metadata(writer: GGUFWriter, arch: str, config, tokenizer, name: str) -> None:
    """Metadata and vocabulary for a model that came from a Hugging Face directory."""
    writer.add_name(name)
    _hparams(writer, arch, config)
    write_vocab(writer, tokenizer, config.vocab_size)
