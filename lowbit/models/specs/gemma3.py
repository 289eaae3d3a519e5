"""Gemma 3 text models: sandwich norms, q/k norms, scaled embeddings, GELU-tanh MLP.

The MLP's linears are fed by `pre_feedforward_layernorm` (not `post_attention_layernorm`,
which normalizes the attention *output* before the residual add). Gemma's RMSNorm multiplies
by (1 + weight), so folding a scale into it must account for the offset.
"""
from .base import ArchSpec, LinearGroup

GEMMA3 = ArchSpec(
    family="gemma3",
    model_types=("gemma3_text", "gemma3"),
    layers="model.layers",
    embed="model.embed_tokens",
    head="lm_head",
    final_norm="model.norm",
    attention="self_attn",
    mlp="mlp",
    groups=(
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("self_attn.v_proj", ("self_attn.o_proj",), source_kind="linear"),
        LinearGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp.up_proj", ("mlp.down_proj",), source_kind="linear"),
    ),
    down="mlp.down_proj",
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    value_out=("self_attn.v_proj", "self_attn.o_proj"),
    rotation_refusal=("Gemma 3's post_attention_layernorm and post_feedforward_layernorm normalize o_proj's and "
                      "down_proj's outputs before the residual add; their weights do not commute with a "
                      "residual rotation R1"),
    extra_norms=("self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
                 "post_feedforward_layernorm"),
    norm_offset=1.0,
    embed_scale="sqrt_hidden",
    hidden_act="gelu_pytorch_tanh",
    layer_returns_tuple=True,
    # the sliding (local) layers turn K with their own, lower RoPE base
    rotary=(("full_attention", "model.rotary_emb"), ("sliding_attention", "model.rotary_emb_local")),
)
