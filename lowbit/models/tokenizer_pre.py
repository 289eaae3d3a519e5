"""Byte-level BPE pre-tokenizers by ``tokenizer.ggml.pre``, as llama.cpp defines them.

The regexes and flags are those of llama.cpp's ``llama-vocab.cpp``
(``llm_tokenizer_bpe`` and ``llama_vocab::impl::load``).  llama.cpp applies the
regexes of a pre-tokenizer one after another, each splitting the pieces left by
the previous one, and keeps both the matches and the text between them; the
``tokenizers`` equivalent is a sequence of ``Split(regex, "isolated")``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PreSpec", "PRE_SPECS", "SUPPORTED_PRE"]

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp, llm_tokenizer_bpe), applied in order.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT_BPE_RES = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreSpec:
    regexes: tuple[str, ...]
    add_bos: bool = False          # llama.cpp's default when add_bos_token is absent
    ignore_merges: bool = False    # a word that is itself a token is not split (llama3)


_LLAMA3 = PreSpec((_LLAMA3_RE,), add_bos=True, ignore_merges=True)
PRE_SPECS: dict[str, PreSpec] = {
    "default": PreSpec(_DEFAULT_BPE_RES),
    "gpt-2": PreSpec((_GPT2_RE,)),
    "gpt2": PreSpec((_GPT2_RE,)),
    "mpt": PreSpec((_GPT2_RE,)),
    "olmo": PreSpec((_GPT2_RE,)),
    "phi-2": PreSpec((_GPT2_RE,)),
    "smollm": PreSpec((r"\p{N}", _GPT2_RE)),
    "starcoder": PreSpec((r"\p{N}", _GPT2_RE)),
    "refact": PreSpec((r"\p{N}", _GPT2_RE)),
    "codeshell": PreSpec((r"\p{N}", _GPT2_RE)),
    "qwen2": PreSpec((_QWEN2_RE,)),
    "deepseek-r1-qwen": PreSpec((_QWEN2_RE,)),
    "stablelm2": PreSpec((_QWEN2_RE,)),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}
SUPPORTED_PRE = tuple(sorted(PRE_SPECS))
