"""A Hugging Face tokenizer (tokenizer.json) as GGUF tokenizer keys, the way llama.cpp's converter
writes them: byte-level BPE as its "gpt2" model (tokens, types, merges), SentencePiece-style BPE
(byte fallback, "▁" for spaces: Gemma, Llama 2) as its "llama" model (tokens, scores, types).

llama.cpp's SentencePiece tokenizer merges, among adjacent symbols, the pair whose concatenation is
the vocabulary piece with the highest score; tokenizer.json states the same order as ranked merges.
So a piece's score here is minus its place in the order its first merge comes in (the converter,
reading tokenizer.model, gets SentencePiece's own scores, which order the pieces the same way).
"""
from __future__ import annotations

import json

from gguf import GGUFWriter, TokenType

from ...errors import LowbitError

ADDED_SCORE = -1000.0  # the converter's score for control, user-defined and padding pieces


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export from an HF directory needs a fast (tokenizer.json) tokenizer")
    return json.loads(backend.to_str())


def _special_ids(writer: GGUFWriter, tokenizer, spec: dict) -> None:
    for tid, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                     (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if tid is not None:
            add(tid)
    post = json.dumps(spec.get("post_processor"))
    writer.add_add_bos_token(tokenizer.bos_token is not None and f'"{tokenizer.bos_token}"' in post)
    writer.add_add_eos_token(tokenizer.eos_token is not None and f'"{tokenizer.eos_token}"' in post
                             and tokenizer.eos_token != tokenizer.bos_token)


def _merge_pairs(spec: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges", [])]


def bpe_vocab(writer: GGUFWriter, tokenizer, spec: dict, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's "gpt2" model: tokens by id, types, merges, special ids."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    # the embedding may have more rows than the tokenizer has tokens: pad as the converter does
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i not in by_id else TokenType.NORMAL
             for i in range(vocab_size)]
    merges = [" ".join(pair) for pair in _merge_pairs(spec)]
    if not merges:  # llama.cpp requires tokenizer.ggml.merges, and GGUF cannot store an empty array
        raise LowbitError("the tokenizer is a byte-level BPE without merges: llama.cpp cannot load it from a GGUF")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    _special_ids(writer, tokenizer, spec)


def _adds_space_prefix(spec: dict) -> bool:
    """A "▁" put before the text: a Prepend normalizer or a Metaspace pre-tokenizer that prepends."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text
                                   and '"add_prefix_space": false' not in text)


def spm_vocab(writer: GGUFWriter, tokenizer, spec: dict, vocab_size: int) -> None:
    """SentencePiece-style BPE as llama.cpp's "llama" model: tokens, scores, types, special ids."""
    vocab = spec["model"]["vocab"]  # piece -> id
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    first_merge: dict[str, int] = {}
    for rank, (left, right) in enumerate(_merge_pairs(spec)):
        first_merge.setdefault(left + right, rank)
    # normal pieces in merge order (pieces no merge makes, single characters, last, by id)
    normal = sorted((i for i in by_id if i not in added), key=lambda i: (first_merge.get(by_id[i], len(first_merge)), i))
    scores = dict.fromkeys(range(vocab_size), ADDED_SCORE)
    scores.update({i: -float(k) for k, i in enumerate(normal)})
    tokens, types = [], []
    for i in range(vocab_size):
        piece = by_id.get(i)
        a = added.get(i)
        if a is not None:
            # the converter keeps user-defined pieces with real spaces (they are matched before escaping)
            piece = a["content"] if a["special"] or not a.get("normalized") else a["content"].replace("▁", " ")
            types.append(TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
        elif piece is None:
            piece = f"[PAD{i}]"
            types.append(TokenType.UNUSED)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(TokenType.BYTE)
            scores[i] = 0.0
        elif piece == spec["model"].get("unk_token"):
            types.append(TokenType.UNKNOWN)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(piece)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([scores[i] for i in range(vocab_size)])
    writer.add_token_types([int(t) for t in types])
    writer.add_add_space_prefix(_adds_space_prefix(spec))
    _special_ids(writer, tokenizer, spec)


def write_vocab(writer: GGUFWriter, tokenizer, vocab_size: int) -> str:
    """The tokenizer keys for `tokenizer`; returns the llama.cpp tokenizer model written."""
    spec = _spec(tokenizer)
    model = spec["model"]
    if model["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        bpe_vocab(writer, tokenizer, spec, vocab_size)
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback"):
        spm_vocab(writer, tokenizer, spec, vocab_size)
        return "llama"
    raise LowbitError(f"GGUF export from an HF directory supports byte-level BPE and SentencePiece-style BPE "
                      f"tokenizers, not {model['type']}")
