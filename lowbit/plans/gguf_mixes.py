"""llama.cpp's quantization mixes as data, and the per-tensor type choice it makes for each.

A mix (Q4_K_M, ...) names a base type and a `general.file_type`; `tensor_type` re-states
llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the dense decoder families lowbit
writes (Llama, Gemma 3, Qwen2): which tensors stay float, the extra bits for attn_v / ffn_down in
the layers `use_more_bits` picks, the output / tied token_embd rule, and the fallback to a
32-weight block type when a row length is not a multiple of 256 (SmolLM2's 576, Gemma's 640).
Arch-specific branches for Falcon, MoE (n_expert == 8), 70B and the IQ mixes are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowbit.plans.plan import FormatPlan

# ggml block sizes of the types a mix can pick (F16/F32: one weight per "block")
BLOCK_SIZE = MappingProxyType({"F32": 1, "F16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
                               "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256})
FLOAT_TYPES = ("F32", "F16")
# tensor_type_fallback: the 32-block type a 256-block type becomes on a ragged row
FALLBACK = MappingProxyType({"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"})


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: its name, the base tensor type, and the `general.file_type` id (LlamaFileType)."""

    name: str
    base_type: str
    file_type: int

    def __post_init__(self):
        if self.base_type not in BLOCK_SIZE:
            raise ValueError(f"mix {self.name}: unknown base type {self.base_type!r}")
        if self.file_type < 0:
            raise ValueError(f"mix {self.name}: file_type must be >= 0, got {self.file_type}")


# ids from llama.h's llama_ftype (= gguf.LlamaFileType)
MIXES: MappingProxyType[str, Mix] = MappingProxyType({m.name: m for m in (
    Mix("F32", "F32", 0),
    Mix("F16", "F16", 1),
    Mix("Q8_0", "Q8_0", 7),
    Mix("Q2_K", "Q2_K", 10),
    Mix("Q3_K_M", "Q3_K", 12),
    Mix("Q4_K_S", "Q4_K", 14),
    Mix("Q4_K_M", "Q4_K", 15),
    Mix("Q5_K_M", "Q5_K", 17),
)})


def mix(name: str) -> Mix:
    try:
        return MIXES[name]
    except KeyError:
        raise ValueError(f"unknown GGUF type {name!r}; known: {', '.join(MIXES)}") from None


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of layers that get more bits: the first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_quantizable(tensor_name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization for dense models: 2-D+ `*weight` tensors that are not norms."""
    return len(shape) >= 2 and tensor_name.endswith("weight") and "_norm.weight" not in tensor_name


def category(tensor_name: str) -> str:
    """tensor_get_category: the role llama.cpp reads from a GGUF tensor name (substring tests, in its order)."""
    if tensor_name == "output.weight":
        return "output"
    if tensor_name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                     ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in tensor_name:  # a fused qkv counts as attn_v (category_is_attn_v)
            return cat
    return "other"


def _mix_choice(m: Mix, cat: str, row_length: int, layer: int, n_layers: int, n_gqa: int, tied: bool) -> str:
    """llama_tensor_get_type_impl for the mixes in MIXES (dense, non-Falcon)."""
    new = m.base_type
    if cat == "output" or (tied and cat == "token_embd"):
        # a tied token_embd is quantized as the output tensor would be
        if row_length % BLOCK_SIZE[new]:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        # attn_v layers are counted in file order, one per layer: the counter is the layer index
        if m.name == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if m.name == "Q3_K_M":
            return "Q5_K" if layer < 2 else "Q4_K"
        if m.name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            return "Q6_K"
        if m.name == "Q4_K_S" and layer < 4:
            return "Q5_K"
        return new
    if cat == "ffn_down":
        if m.name == "Q2_K":
            return "Q3_K"
        if m.name == "Q3_K_M":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        if m.name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            return "Q6_K"
        if m.name == "Q4_K_S" and layer < n_layers // 8:
            return "Q5_K"
        return new
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(m.name, new)
    return new


def fallback(type_name: str, row_length: int) -> str:
    """tensor_type_fallback: a type whose block does not divide the row becomes a 32-block type, else F16."""
    if row_length % BLOCK_SIZE[type_name] == 0:
        return type_name
    smaller = FALLBACK.get(type_name, type_name)
    return smaller if row_length % BLOCK_SIZE[smaller] == 0 else "F16"


def tensor_type(mix_name: str, tensor_name: str, shape: tuple[int, ...], layer: int | None, n_layers: int,
                n_gqa: int = 1, has_output: bool = False) -> str:
    """The GGUF type llama.cpp gives `tensor_name` when it quantizes a float32 model to `mix_name`.

    shape: PyTorch order [rows, row_length] (ggml's ne[0] is the last entry); layer: the block index
    of a blk.N tensor (None otherwise); n_gqa: attention heads per KV head; has_output: the file has
    its own output.weight (else the embeddings are tied and token_embd is chosen as the output).
    Tensors that are not quantized keep the source type, F32 here.
    """
    m = mix(mix_name)
    if not is_quantizable(tensor_name, shape) or m.base_type == "F32":
        return "F32"
    if m.base_type == "F16":  # not a quantized type: llama.cpp applies no mix rule and no fallback
        return "F16"
    cat = category(tensor_name)
    if cat in ("attn_v", "ffn_down", "ffn_gate", "ffn_up") and layer is None:
        raise ValueError(f"{tensor_name}: a per-layer tensor needs its layer index")
    row_length = int(shape[-1])
    chosen = _mix_choice(m, cat, row_length, layer if layer is not None else 0, n_layers, n_gqa, not has_output)
    return fallback(chosen, row_length)


def mix_plan(model_config, spec, mix_name: str) -> "FormatPlan":
    """A llama.cpp mix as a FormatPlan: one exact rule per decoder linear, and the embedding / LM
    head with the type llama.cpp gives token_embd / output (a tied embedding takes the output's).
    F32/F16 choices become "keep float". model_config: the transformers config; spec: its ArchSpec."""
    from lowbit.formats import GGUFFormat
    from lowbit.models.gguf_names import family_for, gguf_name
    from lowbit.plans.plan import FormatPlan

    the_mix = mix(mix_name)
    family = family_for(model_config.model_type)
    n_layers = model_config.num_hidden_layers
    n_gqa = model_config.num_attention_heads // (getattr(model_config, "num_key_value_heads", None)
                                                 or model_config.num_attention_heads)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    # a linear's row length, from the spec's data: a norm-fed group reads the residual stream; a group
    # fed by a linear reads the attention output (v → o) or the MLP's intermediate (up → down)
    widths = {"norm": model_config.hidden_size, spec.attention: model_config.num_attention_heads * head_dim,
              spec.mlp: model_config.intermediate_size}
    row_length = {lin: widths["norm" if g.source_kind == "norm" else g.source.split(".")[0]]
                  for g in spec.groups for lin in g.linears}
    rules = []
    for i in range(n_layers):
        for lin in spec.linears:
            name, layer = gguf_name(f"{spec.layers}.{i}.{lin}.weight", family)
            cols = row_length[lin]
            rules.append((f"{spec.layers}.{i}.{lin}",
                          tensor_type(the_mix.name, name, (1, cols), layer, n_layers, n_gqa, has_output=not tied)))
    hidden = model_config.hidden_size
    head = tensor_type(the_mix.name, "output.weight", (1, hidden), None, n_layers, n_gqa, has_output=not tied)
    if tied:
        rules.append((spec.embed, head))
    else:
        rules.append((spec.head, head))
        rules.append((spec.embed, tensor_type(the_mix.name, "token_embd.weight", (1, hidden), None, n_layers, n_gqa,
                                              has_output=True)))
    as_format = lambda t: None if t in FLOAT_TYPES else GGUFFormat(t)  # noqa: E731
    return FormatPlan(tuple((n, as_format(t)) for n, t in rules), None, origin=f"gguf mix {the_mix.name}")


K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")   # the planner's GGUF candidates by default


def linear_budget_bpw(plan: "FormatPlan", shapes: dict[str, tuple[int, int]]) -> float:
    """Bits per weight the plan of a mix stores the named linears in (ggml bytes × 8 / weights): the size
    a planned file must not exceed on those tensors to be no larger than the mix's file."""
    bits = params = 0
    for name, shape in shapes.items():
        fmt = plan.format_for(name)
        if fmt is None:
            raise ValueError(f"{plan.origin} keeps {name} in float: no budget to plan within")
        bits += fmt.storage_bits(shape)
        params += shape[0] * shape[1]
    return bits / params


def with_mix_edges(choices: dict[str, "object"], mix: "FormatPlan", mix_name: str,
                   outliers: tuple = ()) -> "FormatPlan":
    """A FormatPlan with the planner's format per decoder linear ({name: Format}) and the rule of
    `mix` (the plan of llama.cpp's mix `mix_name`) for every other tensor it names (the embedding, the
    head): a file the size of the mix's where the planner chose the linears' types."""
    from lowbit.plans.plan import FormatPlan

    edges = tuple((n, f) for n, f in mix.rules if n not in choices)
    return FormatPlan(tuple(choices.items()) + edges, None, origin=f"lowbit plan --like {mix_name}",
                      outliers=outliers)
