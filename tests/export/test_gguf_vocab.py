"""GGUF tokenizer keys written from a Hugging Face tokenizer (export from an HF directory): the
SentencePiece-style BPE of Gemma becomes llama.cpp's "llama" model with the same pieces, types and
special keys as llama.cpp's converter wrote, and llama.cpp tokenizes with it exactly as with the source."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from support import EVAL_TEXT
from tokenizer_refs import SYNTH_TEXTS, save_and_reload, sentencepiece_trained, training_text, write_gguf

from lowbit.errors import LowbitError
from lowbit.export.gguf.vocab import write_vocab
from lowbit.models.tokenizer import tokenizer_from_gguf

KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix")


def _fields(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}


def _vocab_only(path: Path, tokenizer, vocab_size: int, arch: str = "llama") -> Path:
    writer = GGUFWriter(str(path), arch)
    model = write_vocab(writer, tokenizer, vocab_size)
    assert model in ("gpt2", "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
def test_sentencepiece_vocab_round_trips_through_an_hf_tokenizer(add_dummy_prefix, tmp_path):
    """converter-written GGUF -> lowbit's HF tokenizer (saved, reloaded) -> GGUF keys again: the
    same pieces, types and special keys, scores in the same order, and the same tokens."""
    sp, proto = sentencepiece_trained(add_dummy_prefix)
    tokens = [p.piece.replace("▁", " ") if p.type == 4 else p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    source = write_gguf(tmp_path / "src.gguf", model="llama", pre="default", tokens=tokens, scores=scores,
                        types=[p.type for p in proto.pieces], bos=2, eos=1, unk=3, pad=0, add_bos=True,
                        add_space_prefix=add_dummy_prefix)
    hf = save_and_reload(tokenizer_from_gguf(source), tmp_path / "hf")
    ours = _vocab_only(tmp_path / "ours.gguf", hf, len(tokens))
    theirs_f, ours_f = _fields(source), _fields(ours)
    assert ours_f["tokenizer.ggml.tokens"] == tokens
    # the unknown piece is a special added token in tokenizer.json, so it comes back CONTROL (3), as the
    # converter makes it when tokenizer_config.json lists it (Gemma 3's file has <unk> as 3 too)
    assert ours_f["tokenizer.ggml.token_type"] == [3 if t == 2 else t for t in theirs_f["tokenizer.ggml.token_type"]]
    for key in KEYS:
        assert ours_f[key] == theirs_f[key], key
    # scores: among normal pieces a merge result ranks where SentencePiece's score puts it
    types = np.array(theirs_f["tokenizer.ggml.token_type"])
    merged = [i for i in np.flatnonzero(types == 1) if len(tokens[i]) > 1]
    ours_s = np.array(ours_f["tokenizer.ggml.scores"])[merged]
    theirs_s = np.array(scores)[merged]
    assert np.array_equal(np.argsort(-ours_s, kind="stable"), np.argsort(-theirs_s, kind="stable"))
    again = tokenizer_from_gguf(ours)
    for text in [training_text()[:5000], *SYNTH_TEXTS]:
        assert again(text)["input_ids"] == hf(text)["input_ids"], text


def test_unsupported_tokenizer_model_is_one_clear_error(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(LowbitError, match="not WordLevel"):
        _vocab_only(tmp_path / "x.gguf", tok, 2)


@pytest.mark.real_model
def test_gemma3_vocab_from_an_hf_tokenizer_tokenizes_like_the_source_in_llama_cpp(tmp_path):
    """Gemma 3 270M: its tokenizer as an HF directory holds it (lowbit's, built from the GGUF), written
    back as GGUF keys, equals the converter's keys piece for piece, and llama.cpp turns WikiText-2 test
    into the same 292k tokens with either file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoConfig

    from lowbit.export.gguf.metadata import write_hf_metadata
    from lowbit.models.registry import resolve

    source = resolve("gemma3-270m").path
    hf = save_and_reload(tokenizer_from_gguf(source), tmp_path / "hf")
    config = AutoConfig.for_model("gemma3_text", **_gemma_config(source))
    path = tmp_path / "gemma-vocab.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    write_hf_metadata(writer, "gemma3", config, hf, "gemma-3-270m")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    theirs, ours = _fields(source), _fields(path)
    for key in (*KEYS, "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_eos_token"):
        assert ours[key] == theirs[key], key
    text = EVAL_TEXT.read_text()
    ids = []
    for gguf_path in (source, path):
        llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        ids.append(llm.tokenize(text.encode(), add_bos=True, special=False))
        del llm
    assert len(ids[0]) > 290_000 and ids[0] == ids[1]


def _gemma_config(source) -> dict:
    """The HF config fields write_hf_metadata reads, from the source GGUF's own keys."""
    f = {k: v.contents() for k, v in GGUFReader(str(source)).fields.items() if k.startswith("gemma3.")}
    return {"vocab_size": 262144, "max_position_embeddings": f["gemma3.context_length"],
            "hidden_size": f["gemma3.embedding_length"], "num_hidden_layers": f["gemma3.block_count"],
            "intermediate_size": f["gemma3.feed_forward_length"], "num_attention_heads": f["gemma3.attention.head_count"],
            "num_key_value_heads": f["gemma3.attention.head_count_kv"], "head_dim": f["gemma3.attention.key_length"],
            "rms_norm_eps": f["gemma3.attention.layer_norm_rms_epsilon"], "rope_theta": f["gemma3.rope.freq_base"],
            "sliding_window": f["gemma3.attention.sliding_window"]}
