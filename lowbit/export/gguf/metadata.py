"""GGUF key/values: copied from the source GGUF, or written from an HF config + tokenizer the way
llama.cpp's converter writes them (hyper-parameters per family, a byte-level BPE vocabulary).

Keys describing the file itself (GGUF.*, general.architecture, general.file_type,
general.quantization_version) are never copied; the writer sets them for the file it writes.
"""
from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

from ...errors import LowbitError

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


def _bpe_vocab(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model: tokens by id, types, merges, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export from an HF directory needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise LowbitError(f"GGUF export from an HF directory supports byte-level BPE tokenizers only, "
                          f"not {spec['model']['type']}")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    # the embedding may have more rows than the tokenizer has tokens: pad as the converter does
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i not in by_id else TokenType.NORMAL
             for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:  # llama.cpp requires tokenizer.ggml.merges, and GGUF cannot store an empty array
        raise LowbitError("the tokenizer is a byte-level BPE without merges: llama.cpp cannot load it from a GGUF")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    post = json.dumps(spec.get("post_processor"))
    writer.add_add_bos_token(tokenizer.bos_token is not None and f'"{tokenizer.bos_token}"' in post)


def write_hf_metadata(writer: GGUFWriter, arch: str, config, tokenizer, name: str) -> None:
    """Metadata and vocabulary for a model that came from a Hugging Face directory."""
    writer.add_name(name)
    _hparams(writer, arch, config)
    _bpe_vocab(writer, tokenizer, config.vocab_size)
