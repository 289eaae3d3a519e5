"""Qwen2 / Qwen2.5: the Llama layout plus biases on the q, k and v projections."""
from .base import ArchSpec, LinearGroup

QWEN2 = ArchSpec(
    family="qwen2",
    model_types=("qwen2",),
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
    biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    # one rotary module for both attention types (sliding layers when use_sliding_window)
    rotary=(("full_attention", "model.rotary_emb"), ("sliding_attention", "model.rotary_emb")),
    notes="v_proj's bias is divided with its rows when an o_proj scale is folded into it",
)
