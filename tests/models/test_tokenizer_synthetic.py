"""Tokenizers built from synthetic GGUF vocabularies agree with independent references."""
from __future__ import annotations


import pytest

from lowbit.models.tokenizer import SUPPORTED_PRE, gguf_tokenizer_kind, read_gguf_vocab, tokenizer_from_gguf
from lowbit.models.tokenizer_gguf import read_gguf_metadata
from lowbit.models.tokenizer_pre import PRE_SPECS
from tokenizer_refs import (
    ReferenceByteBPE,
    SMOLLM_RES,
    SYNTH_TEXTS,
    llama_cpp_spm_encode,
    save_and_reload,
    sentencepiece_trained,
    train_byte_bpe,
    training_text,
    write_bytes,
    write_gguf,
)


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
