"""Definitions and thresholds of every detector, as frozen data (each states where it comes from)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SENSITIVITY_MODES = ("layer", "linear", "none")


def _positive(owner: str, **values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{owner}.{name} must be a number > 0, got {v!r}")


def _fraction(owner: str, **values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"{owner}.{name} must be in (0, 1], got {v!r}")


@dataclass(frozen=True)
class FeatureConfig:
    """LLM.int8() outlier features (Dettmers et al. 2022; seed 001 §1.1)."""

    magnitude: float = 6.0          # |x| >= 6
    min_layers: float = 0.25        # in >= 25% of the layers
    min_positions: float = 0.06     # at >= 6% of the sequence positions

    def __post_init__(self):
        _positive("FeatureConfig", magnitude=self.magnitude)
        _fraction("FeatureConfig", min_layers=self.min_layers, min_positions=self.min_positions)

    @property
    def definition(self) -> str:
        return (f"A hidden dimension is an outlier feature when, in at least {self.min_layers:.0%} of the decoder "
                f"layers, the inputs of the linears that read the normalized hidden state (attention and MLP "
                f"inputs) reach |x| >= {self.magnitude:g} in that dimension at at least {self.min_positions:.0%} of "
                "the sequence positions (LLM.int8(), Dettmers et al. 2022).")


@dataclass(frozen=True)
class MassiveConfig:
    """Massive activations in the residual stream (Sun et al. 2024; seed 001 §2.2.1)."""

    min_value: float = 100.0        # |h| > 100
    min_ratio: float = 1000.0       # and >= ~1000x the median |h| of that hidden state

    def __post_init__(self):
        _positive("MassiveConfig", min_value=self.min_value, min_ratio=self.min_ratio)

    @property
    def definition(self) -> str:
        return (f"A residual-stream value (the output of a decoder layer) is massive when |h| > {self.min_value:g} "
                f"and |h| >= {self.min_ratio:g} x the median |h| of that hidden state (one sample, all positions "
                "and dimensions of that layer's output) (Massive Activations, Sun et al. 2024).")


@dataclass(frozen=True)
class SuperWeightConfig:
    """Super weights in the down projection (Yu et al. 2024; seed 001 §2.2.2).

    The seeds give the procedure, not numbers: min_share, confirm_ratio and min_kld are lowbit's;
    "massive" is MassiveConfig's definition.
    """

    min_share: float = 0.5          # x_k * W[j, k] explains >= half of the output y_j at that token
    min_growth: float = 0.5         # the layer adds >= half of the massive value h_j (|h_j - h_j before| >= 0.5 |h_j|)
    rounds: int = 3                 # remove, re-run, look again
    max_per_round: int = 8          # candidates kept per round, the largest massive values first
    confirm_ratio: float = 10.0     # zeroing raises KLD >= 10x the random control's ...
    min_kld: float = 0.01           # ... and by at least 0.01 nats

    def __post_init__(self):
        _positive("SuperWeightConfig", confirm_ratio=self.confirm_ratio, min_kld=self.min_kld)
        _fraction("SuperWeightConfig", min_share=self.min_share, min_growth=self.min_growth)
        for name in ("rounds", "max_per_round"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SuperWeightConfig.{name} must be an int >= 1, got {v!r}")

    @property
    def definition(self) -> str:
        return ("A super weight W[j, k] of a layer's down projection creates a super (massive) activation: at a "
                "token where the layer's output h has a massive value in dimension j and the layer itself added "
                f">= {self.min_growth:.0%} of it, the down projection's output spikes at row j (its largest |y| at "
                "that token), its input spikes at channel k (its largest |x|), and x_k * W[j, k] explains "
                f">= {self.min_share:.0%} of y_j. Found weights (at most {self.max_per_round} per round, the largest "
                "massive values first) are zeroed "
                f"and the search repeated (at most {self.rounds} rounds) until no massive activation is created "
                "that way (The Super Weight in LLMs, Yu et al. 2024). Each is verified by zeroing it alone and "
                "measuring perplexity and KL divergence next to a control that zeroes as many random weights of "
                f"the same layer; confirmed when its KLD is >= {self.confirm_ratio:g} x the control's and >= "
                f"{self.min_kld:g} nats. The numeric thresholds are lowbit's; the seeds give the procedure.")


@dataclass(frozen=True)
class LevelsConfig:
    """Effective quantization levels per channel (seed 001 §1.7)."""

    bits: tuple[int, ...] = (8, 4)

    def __post_init__(self):
        if not self.bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in self.bits):
            raise ValueError(f"LevelsConfig.bits must be ints in 2..16, got {self.bits!r}")

    @property
    def definition(self) -> str:
        return ("Levels a channel effectively uses under absmax scaling with b bits: 2^b x (the channel's range "
                "inside one scale group) / (the group's scale). Per tensor: 2^b x max|x_i| / max|x| (seed 001 "
                "§1.7); per token: each token is its own group, so 2^b x mean over tokens of |x_ti| / max_j |x_tj|.")


@dataclass(frozen=True)
class WeightConfig:
    """Weight statistics per linear and the RTN error of a few symmetric absmax formats."""

    formats: tuple[tuple[int, int], ...] = ((8, 0), (4, 64), (3, 64))   # (bits, group size; 0 = per row)

    def __post_init__(self):
        if not self.formats:
            raise ValueError("WeightConfig.formats must name at least one (bits, group) pair")


@dataclass(frozen=True)
class SensitivityConfig:
    """KLD against the float model when one layer (or one linear) alone is RTN-quantized."""

    mode: str = "layer"             # "layer" | "linear" | "none"
    bits: tuple[int, ...] = (4, 3)
    group_size: int = 64

    def __post_init__(self):
        if self.mode not in SENSITIVITY_MODES:
            raise ValueError(f"SensitivityConfig.mode must be one of {SENSITIVITY_MODES}, got {self.mode!r}")
        if not self.bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in self.bits):
            raise ValueError(f"SensitivityConfig.bits must be ints in 2..8, got {self.bits!r}")


@dataclass(frozen=True)
class AnalyzeConfig:
    samples: int = 4                # sequences analysed
    seq_len: int = 256              # tokens per sequence, BOS included
    seed: int = 0                   # where the sequences start in the text
    eval_samples: int = 1           # sequences for perplexity / KLD checks (the first ones)
    eval_tokens: int = 128          # tokens of each of them (BOS included)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    massive: MassiveConfig = field(default_factory=MassiveConfig)
    super_weights: SuperWeightConfig = field(default_factory=SuperWeightConfig)
    levels: LevelsConfig = field(default_factory=LevelsConfig)
    weights: WeightConfig = field(default_factory=WeightConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)

    def __post_init__(self):
        for name in ("samples", "seq_len", "eval_samples", "eval_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.seq_len < 8:
            raise ValueError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.eval_samples > self.samples:
            raise ValueError(f"--eval-samples {self.eval_samples} is more than --samples {self.samples}")
        if not 2 <= self.eval_tokens:
            raise ValueError(f"--eval-tokens must be at least 2, got {self.eval_tokens}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, sub in (("features", self.features), ("massive", self.massive),
                         ("super_weights", self.super_weights), ("levels", self.levels)):
            d[key]["definition"] = sub.definition
        return d
