"""Llama family (SmolLM2, Llama 2/3, Mistral-like): pre-norm blocks, SwiGLU MLP."""
from .base import ArchSpec, LinearGroup

LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "mistral"),
    layers="model.layers",
    embed="model.embed_tokens",
    head="lm_head",
    final_norm="model.norm",
    attention="self_attn",
    mlp="mlp",
    groups=(
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("self_attn.v_proj", ("self_attn.o_proj",), source_kind="linear"),
        LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",), source_kind="linear"),
    ),
    down="mlp.down_proj",
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    value_out=("self_attn.v_proj", "self_attn.o_proj"),
    hidden_act="silu",
)
