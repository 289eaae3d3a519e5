"""Architecture knowledge as data: one ArchSpec per model family.

A spec names where things live inside a transformers model (module paths relative to the
model or to one decoder layer) and which normalization feeds which linears. Algorithms read
the spec; they never check class names.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the module that produces that input.

    `source` is a norm (its weight can absorb per-channel input scales) or a linear (v → o,
    up → down: its output rows can absorb them). `source_kind` says which.
    """

    source: str                      # path inside the layer, e.g. "input_layernorm"
    linears: tuple[str, ...]         # paths inside the layer, e.g. ("self_attn.q_proj", ...)
    source_kind: str = "norm"        # "norm" | "linear"

    def __post_init__(self):
        if self.source_kind not in ("norm", "linear"):
            raise ValueError(f"LinearGroup.source_kind must be 'norm' or 'linear', got {self.source_kind!r}")
        if not self.linears:
            raise ValueError("LinearGroup.linears must name at least one linear")


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one model family live.

    Paths are dotted attribute paths; `layers` is relative to the top model, the others to
    one decoder layer.
    """

    family: str                               # "llama", "gemma3", ...
    model_types: tuple[str, ...]              # transformers config.model_type values it covers
    layers: str                               # "model.layers"
    embed: str                                # "model.embed_tokens"
    head: str                                 # "lm_head"
    final_norm: str                           # "model.norm"
    attention: str                            # "self_attn"
    mlp: str                                  # "mlp"
    groups: tuple[LinearGroup, ...]           # who feeds whom, in forward order
    down: str                                 # "mlp.down_proj": where super weights live
    extra_norms: tuple[str, ...] = ()         # norms that feed no linear (post-norms, q/k norms)
    norm_offset: float = 0.0                  # RMSNorm scales by (offset + weight): Gemma uses 1
    embed_scale: str = "none"                 # "none" | "sqrt_hidden": embeddings multiplied by sqrt(d)
    hidden_act: str = "silu"
    layer_returns_tuple: bool = False         # decoder layer returns (hidden, ...) instead of hidden
    notes: str = ""
    biases: tuple[str, ...] = field(default=())  # linears that carry a bias
    # Rotations (lowbit.rotations): the linears whose output is added to the residual stream,
    # the (v, o) pair a per-head rotation R2 goes between, and why R1 cannot be fused (if so).
    residual_writers: tuple[str, ...] = ()    # ("self_attn.o_proj", "mlp.down_proj")
    value_out: tuple[str, ...] = ()           # ("self_attn.v_proj", "self_attn.o_proj")
    rotation_refusal: str = ""
    # RoPE (lowbit.kv.rope): the rotary module serving each attention type of config.layer_types
    rotary: tuple[tuple[str, str], ...] = (("full_attention", "model.rotary_emb"),)

    def __post_init__(self):
        if self.embed_scale not in ("none", "sqrt_hidden"):
            raise ValueError(f"ArchSpec.embed_scale must be 'none' or 'sqrt_hidden', got {self.embed_scale!r}")
        names = [n for g in self.groups for n in g.linears]
        if len(names) != len(set(names)):
            raise ValueError(f"ArchSpec {self.family}: a linear appears in two groups")
        if self.down not in names:
            raise ValueError(f"ArchSpec {self.family}: down={self.down!r} is not one of its linears")
        if any(n not in names for n in (*self.residual_writers, *self.value_out)):
            raise ValueError(f"ArchSpec {self.family}: residual_writers/value_out name a linear it does not have")

    @property
    def residual_readers(self) -> tuple[str, ...]:
        """The linears that read a normalized residual stream (the norm-sourced groups)."""
        return tuple(n for g in self.groups if g.source_kind == "norm" for n in g.linears)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear inside one decoder layer, in forward order."""
        return tuple(n for g in self.groups for n in g.linears)


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from a transformers config (the spec says where; the config says how big)."""

    hidden: int
    intermediate: int
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            max_positions=config.max_position_embeddings,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
