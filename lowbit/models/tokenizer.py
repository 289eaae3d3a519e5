"""Build a fast Hugging Face tokenizer straight from a GGUF file's own vocabulary.

transformers' GGUF tokenizer conversion turns Gemma 3's SentencePiece-BPE
vocabulary into a Unigram model (transformers issue 41494): " English" becomes
" E","ng","li","sh" and WikiText-2 test grows from ~292k to ~573k tokens, which
makes every perplexity meaningless.  It is also slow.  This module rebuilds the
tokenizer with the ``tokenizers`` library, following what llama.cpp (the
format's reference implementation) and SentencePiece do:

``tokenizer.ggml.model == "llama"`` (SentencePiece BPE: pieces + scores, no merges)
    A BPE model whose merges are every split ``left + right`` of a piece into two
    pieces, ranked by the score of the merged piece (SentencePiece's BPE merges
    the adjacent pair whose concatenation has the highest score).  Spaces become
    "▁" (with a leading "▁" when ``add_space_prefix``), characters outside the
    vocabulary fall back to the ``<0xNN>`` byte pieces.  Control pieces (type 3)
    are special added tokens; user-defined pieces (type 4: Gemma's "\\n" runs,
    space runs, tabs, HTML tags) are non-special added tokens matched,
    leftmost-longest, on the normalized text and never merged with their
    neighbours, exactly like SentencePiece's frozen user-defined symbols.
    (llama.cpp's converter stores user-defined pieces with real spaces instead of
    "▁"; the "▁" is put back so that they match where SentencePiece matches them.
    With ``add_space_prefix`` they are matched on the raw text as llama.cpp does,
    see ``_user_defined_on_normalized_text``.)
    No pre-tokenizer: SentencePiece runs BPE over the whole normalized text, and
    Gemma has pieces that span a "▁".

``tokenizer.ggml.model == "gpt2"`` (byte-level BPE with merges)
    The merges in file order, byte-level alphabet, and the pre-tokenizer regexes
    llama.cpp uses for ``tokenizer.ggml.pre`` (applied one after another, each
    splitting the pieces of the previous one).

BOS/EOS are added by the post-processor exactly when the GGUF's
``add_bos_token`` / ``add_eos_token`` say so (llama.cpp's defaults when absent:
"llama" adds BOS, "gpt2" does not, except for the llama3-style pre-tokenizers).
The result is a plain ``PreTrainedTokenizerFast`` that survives
``save_pretrained`` + ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LowbitError
from .tokenizer_gguf import read_gguf_metadata
from .tokenizer_pre import PRE_SPECS, SUPPORTED_PRE

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "UnsupportedTokenizerError",
    "GGUFVocab",
    "gguf_tokenizer_kind",
    "read_gguf_vocab",
    "tokenizer_from_gguf",
    "SUPPORTED_MODELS",
    "SUPPORTED_PRE",
]

# llama.cpp token types (LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("llama", "gpt2")


class UnsupportedTokenizerError(LowbitError, ValueError):
    """The GGUF's tokenizer model or pre-tokenizer is not one lowbit can rebuild."""


@dataclass
class GGUFVocab:
    """The tokenizer metadata of a GGUF file, decoded."""

    model: str                      # tokenizer.ggml.model
    pre: str | None                 # tokenizer.ggml.pre
    tokens: list[str]
    types: np.ndarray               # int32, llama.cpp token types
    scores: np.ndarray | None       # float32 (SentencePiece models)
    merges: list[str] | None        # "left right" (byte-level BPE models)
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def _decode_tokens(raw: list[bytes]) -> list[str]:
    tokens = []
    for i, b in enumerate(raw):
        text = b.decode("utf-8", errors="replace")
        tokens.append(text if text else f"[EMPTY_{i}]")  # as llama.cpp does
    return tokens


def read_gguf_vocab(path: str | Path) -> GGUFVocab:
    """Read and validate the tokenizer metadata of a GGUF file."""
    meta = read_gguf_metadata(path, prefixes=("tokenizer.",))
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise UnsupportedTokenizerError(
            f"{Path(path).name}: unsupported tokenizer.ggml.model {model!r} "
            f"(lowbit supports {', '.join(SUPPORTED_MODELS)})")
    pre = meta.get("tokenizer.ggml.pre")
    if model == "gpt2":
        spec = PRE_SPECS.get(pre or "default")
        if spec is None:
            raise UnsupportedTokenizerError(
                f"{Path(path).name}: unsupported tokenizer.ggml.pre {pre!r} for a byte-level BPE "
                f"tokenizer (lowbit supports {', '.join(SUPPORTED_PRE)})")
        if "tokenizer.ggml.merges" not in meta:
            raise UnsupportedTokenizerError(f"{Path(path).name}: gpt2 tokenizer without tokenizer.ggml.merges")
    if "tokenizer.ggml.tokens" not in meta:
        raise UnsupportedTokenizerError(f"{Path(path).name}: no tokenizer.ggml.tokens")
    tokens = _decode_tokens(meta["tokenizer.ggml.tokens"])
    n = len(tokens)
    if len(set(tokens)) != n:
        raise UnsupportedTokenizerError(f"{Path(path).name}: the vocabulary has duplicate tokens")
    types = meta.get("tokenizer.ggml.token_type")
    types = np.full(n, NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
    scores = meta.get("tokenizer.ggml.scores")
    if model == "llama" and scores is None:
        raise UnsupportedTokenizerError(f"{Path(path).name}: SentencePiece tokenizer without tokenizer.ggml.scores")
    merges = None
    if model == "gpt2":
        merges = [m.decode("utf-8", errors="replace") for m in meta["tokenizer.ggml.merges"]]

    def token_id(key: str, default: int | None) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}", default)
        return int(value) if value is not None and 0 <= int(value) < n else default

    is_spm = model == "llama"
    default_add_bos = True if is_spm else PRE_SPECS[pre or "default"].add_bos
    return GGUFVocab(
        model=model,
        pre=pre,
        tokens=tokens,
        types=types,
        scores=None if scores is None else np.asarray(scores, np.float32),
        merges=merges,
        # llama.cpp's defaults for a SentencePiece vocabulary are bos 1, eos 2, unk 0.
        bos_id=token_id("bos_token_id", 1 if is_spm else None),
        eos_id=token_id("eos_token_id", 2 if is_spm else None),
        unk_id=token_id("unknown_token_id", 0 if is_spm else None),
        pad_id=token_id("padding_token_id", None),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", is_spm)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def gguf_tokenizer_kind(path: str | Path) -> str:
    """``"llama"`` (SentencePiece BPE) or ``"gpt2"`` (byte-level BPE); ValueError otherwise."""
    return read_gguf_vocab(path).model


# ----------------------------------------------------------------------------- building


def _spm_merges(vocab: GGUFVocab) -> list[Any]:
    """SentencePiece BPE as merges: every split of a piece into two pieces, by the piece's score.

    SentencePiece merges, among adjacent symbols, the pair whose concatenation is
    a piece with the highest score (leftmost on ties).  Normal and unused pieces
    take part; user-defined pieces are frozen (split out as added tokens), byte
    and control pieces never result from a merge.
    """
    tokens, types = vocab.tokens, vocab.types
    ids = np.flatnonzero((types == NORMAL) | (types == UNUSED))
    # Highest score first; a stable sort keeps the lower id first on equal scores.
    ids = ids[np.argsort(-vocab.scores[ids].astype(np.float64), kind="stable")]
    pieces = [tokens[i] for i in ids.tolist()]
    piece_set = set(pieces)
    # tokenizer.json merges as "left right" (fastest to write and parse) unless a piece has a space.
    as_string = not any(" " in p for p in pieces)
    merges: list[Any] = []
    append = merges.append
    for piece in pieces:
        for k in range(1, len(piece)):
            left = piece[:k]
            if left in piece_set:
                right = piece[k:]
                if right in piece_set:
                    append(f"{left} {right}" if as_string else [left, right])
    return merges


def _user_defined_on_normalized_text(vocab: GGUFVocab) -> bool:
    """Whether user-defined pieces are matched after spaces became "▁" (SentencePiece's way).

    That is exact for SentencePiece vocabularies without a dummy prefix (Gemma).
    With a dummy prefix it cannot be expressed in ``tokenizers`` (a ``Prepend``
    normalizer misaligns normalized added tokens), so there the pieces are
    matched on the raw text and every text fragment between them gets the
    prefix -- exactly what llama.cpp does for such GGUFs.
    """
    return vocab.model == "llama" and not vocab.add_space_prefix


def _added_tokens(vocab: GGUFVocab, tokens: list[str]) -> list[dict[str, Any]]:
    """Control/unknown pieces as special tokens, user-defined pieces as plain added tokens."""
    user_normalized = _user_defined_on_normalized_text(vocab)
    special_ids = {i for i in (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) if i is not None}
    types = vocab.types
    ids = set(np.flatnonzero((types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN)).tolist())
    added = []
    for i in sorted(ids | special_ids):
        user = bool(types[i] == USER_DEFINED) and i not in special_ids
        added.append({"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": user and user_normalized, "special": not user})
    return added


def _post_processor(vocab: GGUFVocab, tokens: list[str]) -> dict[str, Any]:
    def piece(i: int | None, what: str) -> str:
        if i is None:
            raise UnsupportedTokenizerError(f"the GGUF asks to add {what} but defines no {what} token id")
        return tokens[i]

    pre, post, special = [], [], {}
    if vocab.add_bos:
        bos = piece(vocab.bos_id, "BOS")
        pre = [bos]
        special[bos] = {"id": bos, "ids": [vocab.bos_id], "tokens": [bos]}
    if vocab.add_eos:
        eos = piece(vocab.eos_id, "EOS")
        post = [eos]
        special[eos] = {"id": eos, "ids": [vocab.eos_id], "tokens": [eos]}

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        items = [{"SpecialToken": {"id": t, "type_id": type_id}} for t in pre]
        items.append({"Sequence": {"id": name, "type_id": type_id}})
        items += [{"SpecialToken": {"id": t, "type_id": type_id}} for t in post]
        return items

    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": special}


def _gguf_merges(merges: list[str]) -> list[Any]:
    """GGUF merges ("left right", split at the first space after the first character, as
    llama.cpp does) for tokenizer.json: as they are when unambiguous, else as pairs."""
    if all(m.count(" ") == 1 and not m.startswith(" ") for m in merges):
        return merges
    pairs = []
    for m in merges:
        pos = m.find(" ", 1)
        if pos > 0:
            pairs.append([m[:pos], m[pos + 1:]])
    return pairs


def _spm_token_texts(vocab: GGUFVocab) -> list[str]:
    """Token texts as SentencePiece has them.

    llama.cpp's converter stores user-defined pieces with real spaces (it matches
    them before escaping whitespace); SentencePiece matches them after escaping,
    so put the "▁" back (unless that would collide with another piece).
    """
    tokens = list(vocab.tokens)
    present = set(tokens)
    for i in np.flatnonzero(vocab.types == USER_DEFINED).tolist():
        escaped = tokens[i].replace(" ", "▁")
        if escaped != tokens[i] and escaped not in present:
            tokens[i] = escaped
            present.add(escaped)
    return tokens


def _tokenizer_json(vocab: GGUFVocab) -> dict[str, Any]:
    """The ``tokenizer.json`` document for ``vocab``."""
    tokens = _spm_token_texts(vocab) if _user_defined_on_normalized_text(vocab) else vocab.tokens
    token_to_id = {t: i for i, t in enumerate(tokens)}
    unk = tokens[vocab.unk_id] if vocab.unk_id is not None else None
    if vocab.model == "llama":
        byte_fallback = all(f"<0x{b:02X}>" in token_to_id for b in range(256))
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": not byte_fallback, "byte_fallback": byte_fallback,
                 "ignore_merges": False, "vocab": token_to_id, "merges": _spm_merges(vocab)}
        norms = [{"type": "Prepend", "prepend": "▁"}] if vocab.add_space_prefix else []
        norms.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
        normalizer = {"type": "Sequence", "normalizers": norms}
        pre_tokenizer = None  # SentencePiece runs BPE over the whole normalized text
        decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}]
        if byte_fallback:
            decoders.append({"type": "ByteFallback"})
        decoders.append({"type": "Fuse"})
        if vocab.add_space_prefix:
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder = {"type": "Sequence", "decoders": decoders}
    else:
        spec = PRE_SPECS[vocab.pre or "default"]
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": spec.ignore_merges, "vocab": token_to_id,
                 "merges": _gguf_merges(vocab.merges or [])}
        normalizer = None
        splits: list[dict[str, Any]] = [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}
            for rx in spec.regexes]
        splits.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False})
        pre_tokenizer = {"type": "Sequence", "pretokenizers": splits}
        decoder = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(vocab, tokens),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(vocab, tokens),
        "decoder": decoder,
        "model": model,
    }


def tokenizer_from_gguf(path: str | Path) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` built from the vocabulary stored in the GGUF file ``path``.

    Raises ``ValueError`` (``UnsupportedTokenizerError``) for a tokenizer model
    other than "llama"/"gpt2" or a byte-level pre-tokenizer lowbit does not know.
    """
    from transformers import PreTrainedTokenizerFast

    vocab = read_gguf_vocab(path)
    document = _tokenizer_json(vocab)
    by_id = {a["id"]: a["content"] for a in document["added_tokens"]}

    def tok(i: int | None) -> str | None:
        return None if i is None else by_id[i]

    kwargs: dict[str, Any] = {
        "bos_token": tok(vocab.bos_id),
        "eos_token": tok(vocab.eos_id),
        "unk_token": tok(vocab.unk_id),
        "pad_token": tok(vocab.pad_id),
        "clean_up_tokenization_spaces": False,
        "chat_template": vocab.chat_template or None,
    }
    # Parsing a tokenizer.json file once is cheaper than Tokenizer.from_str followed by
    # the deep copy PreTrainedTokenizerFast makes of a tokenizer_object.
    with tempfile.TemporaryDirectory(prefix="lowbit-tok-") as tmp:
        file = Path(tmp) / "tokenizer.json"
        file.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file),
                                            **{k: v for k, v in kwargs.items() if v is not None})
    tokenizer.init_kwargs.pop("tokenizer_file", None)
    return tokenizer
