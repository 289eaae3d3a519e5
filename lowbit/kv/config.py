"""What a quantized KV cache stores: method, bits, groups, the float residual window — validated.

  int         K and V per token (groups of `group` along head_dim) or per channel (groups of `group`
              tokens), 2/3/4/8 bits, asymmetric (min/scale) or symmetric.
  kivi        KIVI's layout: K per channel in groups of `group` tokens, V per token in groups of
              `group` along head_dim, 2/3/4/8 bits asymmetric; tokens reach the quantized store in
              whole groups, the newest `residual` (at least) staying in float.
  turboquant  per head a randomized Hadamard, then Lloyd–Max levels for the rotated coordinates;
              bits 2, 2.5, 3, 3.5, 4 (a fractional rate splits the channels: the (b − ⌊b⌋)·head_dim
              channels of largest RMS on the first write get ⌊b⌋ + 1 bits, the rest ⌊b⌋, each set
              rotated on its own); `qjl` gives K's last bit to the QJL residual (unbiased q·k).
center_k      per-token K (turboquant, int per token) minus its per-channel mean over the first write,
              stored once per head in float16 and added back on read: K's near-constant channels (57% of
              its energy on SmolLM2, 38% on Gemma 3) then cost a per-token quantizer little.
scale_k       per-token K divided by per-channel scales s (per layer and head) before quantization and
              multiplied back on read, s from the model's own q and K energies on calibration text
              (key_scales.py): the quantization error then lands where queries are small. The scales
              are supplied beside the config (a saved plan); the config only records that they are used.
sink          the first `sink` tokens of the sequence stay in float (attention sinks, as KVQuant and IntactKV
              keep them): most queries put much of their weight there, so their error reaches every later
              token; the codecs' first-write statistics (center_k's mean, the split) skip them.
pre_rope      K quantized before RoPE (KVQuant): each written key is turned back by its position's RoPE
              angle, quantized (after the options above), and turned again on read (rope.py). Before RoPE
              a channel means the same at every position, so per-channel statistics (center_k's mean,
              scale_k's scales, kivi's per-channel groups) fit any context length; after RoPE the
              high-frequency pairs turn from token to token. It stores nothing more: a token's
              position is its place in the sequence.
Without pre_rope K is quantized after RoPE, as the model hands it to the cache.
norm_correct  turboquant only, "k", "v" or "kv" (which of them; "" none): each vector's stored norm is rescaled
              so that its de-quantized vector x̂ has ⟨x̂, x⟩ = ‖x‖² (quantizers.py). Lloyd–Max levels are
              conditional means, so a reconstruction is shrunk by about 1 − D(b): K's scores shrink (a
              softmax temperature error), V's outputs too. Shrunk scores are the lower-MSE estimate, unshrunk
              ones unbiased; which serves attention better is measured per model (docs/kv_cache.md). It
              stores nothing more (the same float16 norm). With qjl, K keeps QJL's unbiasing.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("int", "kivi", "turboquant")
INT_BITS = (2, 3, 4, 8)
TURBO_BITS = (2, 2.5, 3, 3.5, 4)


@dataclass(frozen=True)
class KvCacheConfig:
    """method, bits, group (int: along head_dim, default 64 where it divides head_dim, else head_dim; kivi: tokens per K group and V's
    group along head_dim, default 32), residual (newest tokens kept in float), axis (int only:
    "token" or "channel"), symmetric (int only), qjl (turboquant only), seed (turboquant's rotations),
    center_k (per-token K less its per-channel mean over the first write), scale_k (per-token K over
    calibrated per-channel scales, key_scales.py), sink (the sequence's first tokens kept in float),
    pre_rope (K quantized before RoPE), norm_correct ("k", "v", "kv": turboquant's norms rescaled, ⟨x̂, x⟩ = ‖x‖²)."""

    method: str = "int"
    bits: float = 4
    group: int | None = None
    residual: int = 0
    axis: str = "token"
    symmetric: bool = False
    qjl: bool = False
    seed: int = 0
    center_k: bool = False
    scale_k: bool = False
    sink: int = 0
    pre_rope: bool = False
    norm_correct: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown KV cache method {self.method!r} (known: {', '.join(METHODS)})")
        allowed = TURBO_BITS if self.method == "turboquant" else INT_BITS
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise ValueError(f"--kv {self.method} supports --kv-bits {', '.join(map(str, allowed))}; got {self.bits!r}")
        if self.group is not None and (isinstance(self.group, bool) or not isinstance(self.group, int)
                                       or self.group < 1):
            raise ValueError(f"KV group must be a positive integer, got {self.group!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"KV residual window must be an integer >= 0, got {self.residual!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"KV sink must be an integer >= 0, got {self.sink!r}")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"KV axis must be 'token' or 'channel', got {self.axis!r}")
        if self.axis == "channel" and self.method != "int":
            raise ValueError("axis applies to --kv int only (kivi fixes K per channel, V per token)")
        if self.symmetric and self.method != "int":
            raise ValueError("symmetric applies to --kv int only")
        if self.symmetric and self.bits < 2:
            raise ValueError("a symmetric grid needs at least 2 bits")
        if self.qjl and self.method != "turboquant":
            raise ValueError("qjl applies to --kv turboquant only")
        if self.center_k and self.token_group() is not None:
            raise ValueError("--kv-center-k (center_k) applies to per-token K (turboquant, int per token): "
                             "per-channel K groups carry their own offsets")
        if self.scale_k and self.token_group() is not None:
            raise ValueError("--kv-scale-k (scale_k) applies to per-token K (turboquant, int per token): "
                             "per-channel K groups carry their own scales")
        if not isinstance(self.pre_rope, bool):
            raise ValueError(f"KV pre_rope must be True or False, got {self.pre_rope!r}")
        if self.norm_correct not in ("", "k", "v", "kv"):
            raise ValueError(f"KV norm_correct must be 'k', 'v', 'kv' or '' (none), got {self.norm_correct!r}")
        if self.norm_correct and self.method != "turboquant":
            raise ValueError("--kv-norm-correct (norm_correct) applies to --kv turboquant only (its Lloyd–Max "
                             "levels shrink; integer grids do not)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"KV seed must be an integer, got {self.seed!r}")

    @property
    def name(self) -> str:
        parts = [f"{self.method}{self.bits:g}"]
        if self.method == "int":
            parts.append(f"{self.axis}" + ("-sym" if self.symmetric else ""))
        if self.group:
            parts.append(f"g{self.group}")
        if self.qjl:
            parts.append("qjl")
        if self.norm_correct:
            parts.append("ncorr" + ("" if self.norm_correct == "kv" else self.norm_correct))
        if self.pre_rope:
            parts.append("prerope")
        if self.center_k:
            parts.append("kcenter")
        if self.scale_k:
            parts.append("kscale")
        if self.sink:
            parts.append(f"sink{self.sink}")
        if self.residual:
            parts.append(f"r{self.residual}")
        return "-".join(parts)

    def token_group(self) -> int | None:
        """Tokens per quantization group along the sequence (per-channel K), or None."""
        if self.method == "kivi" or (self.method == "int" and self.axis == "channel"):
            return self.group or 32
        return None

    def check_context(self, context: int) -> None:
        """ValueError when the residual window (or a token group) does not fit the context."""
        if self.residual > context:
            raise ValueError(f"--kv-residual {self.residual} is larger than the context ({context} tokens)")
        if self.sink > context:
            raise ValueError(f"--kv-sink {self.sink} is larger than the context ({context} tokens)")
        if (g := self.token_group()) is not None and g > context:
            raise ValueError(f"a KV token group of {g} is larger than the context ({context} tokens)")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "KvCacheConfig":
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ValueError(f"unknown KV cache option(s) {sorted(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)
