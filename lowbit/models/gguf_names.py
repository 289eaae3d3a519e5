"""Hugging Face parameter names -> the GGUF tensor names llama.cpp expects, and the two value
transforms its converter applies (conversion/llama.py, conversion/gemma.py of llama.cpp):

* Llama (and Mistral) q/k weights are row-permuted: HF keeps each head's rotary halves as
  [first half | second half], llama.cpp's rope wants them interleaved in pairs; transformers'
  GGUF loader undoes exactly this permutation (LlamaTensorProcessor).
* Gemma norms are stored as 1 + w (Gemma's RMSNorm multiplies by 1 + w; llama.cpp by the stored
  value); transformers' loader subtracts the 1 again (Gemma2TensorProcessor).
Qwen2 needs neither. Norms and other 1-D tensors are always written as float32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import LowbitError

# per decoder layer: HF suffix after "model.layers.N." -> GGUF suffix after "blk.N."
_LAYER_COMMON = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
}
_LLAMA_LAYER = {**_LAYER_COMMON, "post_attention_layernorm.weight": "ffn_norm.weight"}
_QWEN2_LAYER = {**_LLAMA_LAYER, "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias"}
_GEMMA3_LAYER = {
    **_LAYER_COMMON,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


@dataclass(frozen=True)
class Family:
    """How one transformers model_type maps onto a llama.cpp architecture."""

    arch: str                      # general.architecture in the GGUF
    layer_names: dict              # HF layer suffix -> GGUF layer suffix
    permute_qk: bool               # Llama's rotary row permutation of attn_q / attn_k
    norm_offset: float             # added to every norm weight (Gemma: 1.0)

    def __post_init__(self):
        if not self.arch.isidentifier():
            raise ValueError(f"Family.arch must be an identifier, got {self.arch!r}")


FAMILIES = {
    "llama": Family("llama", _LLAMA_LAYER, permute_qk=True, norm_offset=0.0),
    "mistral": Family("llama", _LLAMA_LAYER, permute_qk=True, norm_offset=0.0),
    "qwen2": Family("qwen2", _QWEN2_LAYER, permute_qk=False, norm_offset=0.0),
    "gemma3_text": Family("gemma3", _GEMMA3_LAYER, permute_qk=False, norm_offset=1.0),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES["gemma3_text" if model_type == "gemma3" else model_type]
    except KeyError:
        raise LowbitError(f"no GGUF mapping for family {model_type} (known: {', '.join(FAMILIES)})") from None


def gguf_name(hf_name: str, family: Family) -> tuple[str, int | None]:
    """(GGUF tensor name, layer index or None) of an HF parameter; LowbitError for an unknown one."""
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in family.layer_names:
        return f"blk.{m.group(1)}.{family.layer_names[m.group(2)]}", int(m.group(1))
    if not m and hf_name in _GLOBAL:
        return _GLOBAL[hf_name], None
    raise LowbitError(f"no GGUF name for tensor {hf_name} of a {family.arch} model")


def permute_rotary_rows(W: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """HF q/k rows -> llama.cpp's order: per head, rows [a0..a(d/2-1), b0..] become [a0, b0, a1, b1, ...]
    (inverse: back to HF's halves)."""
    rows = W.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs")
    # [heads, 2 halves, d/2, cols] <-> [heads, d/2, 2, cols]: swapping the two middle axes either way
    middle = (rows // n_heads // 2, 2) if inverse else (2, rows // n_heads // 2)
    return W.reshape(n_heads, *middle, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def unpermute_rotary_rows(W: torch.Tensor, n_heads: int) -> torch.Tensor:
    """permute_rotary_rows undone: llama.cpp's interleaved rotary pairs back to HF's halves."""
    return permute_rotary_rows(W, n_heads, inverse=True)


def gguf_tensor(hf_name: str, value: torch.Tensor, family: Family, n_heads: int, n_kv_heads: int,
                inverse: bool = False) -> torch.Tensor:
    """The float32 values llama.cpp stores for an HF parameter (permuted / shifted as its converter does);
    inverse: those transforms undone (what transformers holds for a tensor read from a GGUF)."""
    value = value.detach().to(torch.float32)
    if family.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
        value = permute_rotary_rows(value, n_heads, inverse)
    elif family.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
        value = permute_rotary_rows(value, n_kv_heads, inverse)
    if family.norm_offset and hf_name.endswith("norm.weight"):
        value = value - family.norm_offset if inverse else value + family.norm_offset
    return value.contiguous()


def hf_tensor(hf_name: str, value: torch.Tensor, family: Family, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """gguf_tensor undone: the float32 values transformers holds for a tensor read from a GGUF."""
    return gguf_tensor(hf_name, value, family, n_heads, n_kv_heads, inverse=True)
