"""`lowbit plan`: a per-tensor format for every decoder linear that minimises the predicted quality
loss at a size of at most `target_bpw` bits per weight (lowbit's count: codes, scales and zero-points
of the quantized linears, as `lowbit quantize` reports it).

Two steps, kept apart (a search returns a plan; applying it is `lowbit quantize --plan`):
  losses   (analysis/tensor_losses.py) predicted loss of every (tensor, format): "kld" measures it — the KL divergence against the
           float model on probe rows when that tensor alone is round-to-nearest quantized (what `lowbit
           analyze`'s sensitivity measures); "kld-gptq" the same KLD with the tensor rounded by GPTQ
           (as `lowbit quantize --plan … --method gptq` stores it); "proxy" estimates it — the Hessian-weighted error
           tr(E H Eᵀ) / n of the same rounding on the same rows (cheap: one pass, no re-evaluation);
           "fisher" (analysis/fisher.py) predicts the KLD of the GPTQ rounding from one gradient pass:
           ½ Σ_i g_i (E H_g Eᵀ)_ii, g the output channels' Fisher information, H_g the inputs'
           second moment weighted by each token's gradient.
           Losses add across tensors (the planner's assumption; bench/plan.py measures how well).
  solve    the multiple-choice knapsack (plans/knapsack.py) over stored sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..formats import Format, format_from_name
from .knapsack import Option, smallest, solve
from .plan import FormatPlan

LOSSES = ("kld", "kld-gptq", "fisher", "proxy")
DEFAULT_FORMATS = ("int2-g64-sym-signed", "int3-g64-sym-signed", "int4-g128-sym-signed", "int4-g64-sym-signed",
                   "int6-g64-sym-signed", "int8-g128-sym-signed")   # the signed grid: the best uniform rows


@dataclass(frozen=True)
class PlannerConfig:
    """target_bpw over the quantized linears; candidate formats by name; loss one of LOSSES;
    outlier_shares: each non-GGUF candidate (or each of outlier_formats) also with that share of the tensor
    kept in float16."""

    target_bpw: float
    formats: tuple[str, ...] = DEFAULT_FORMATS
    loss: str = "kld"
    outlier_shares: tuple[float, ...] = ()     # dense-and-sparse options beside each non-GGUF format
    outlier_formats: tuple[str, ...] | None = None   # only beside these candidates (None: every non-GGUF one)

    def __post_init__(self):
        for name in self.outlier_formats or ():
            if name not in self.formats:
                raise ValueError(f"outlier format {name!r} is not a candidate format ({', '.join(self.formats)})")
        for share in self.outlier_shares:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 0.1:
                raise ValueError(f"an outlier share is a number in (0, 0.1) (0.5% = 0.005), got {share!r}")
        if isinstance(self.target_bpw, bool) or not isinstance(self.target_bpw, (int, float)) or self.target_bpw <= 0:
            raise ValueError(f"--target-bpw must be a positive number, got {self.target_bpw!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown planner loss {self.loss!r} (known: {', '.join(LOSSES)})")
        if not self.formats:
            raise ValueError("the planner needs at least one candidate format")
        for name in self.formats:
            format_from_name(name)                          # ValueError naming the bad format
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"candidate formats repeat: {', '.join(self.formats)}")

    def outlier_beside(self) -> tuple[str, ...] | None:
        """The canonical names of the formats outlier options go beside (None: every non-GGUF candidate)."""
        return None if self.outlier_formats is None else tuple(format_from_name(f).name for f in self.outlier_formats)

    def candidates(self) -> list[Format]:
        return [format_from_name(n) for n in self.formats]


@dataclass(frozen=True)
class TensorChoice:
    name: str
    params: int
    format: str
    bits: int                       # stored bits in that format (and of the kept weights)
    loss: float                     # its predicted loss
    outliers: float = 0.0           # share kept in float16 beside the dense part (dense-and-sparse)

    @property
    def option(self) -> str:
        return option_name(self.format, self.outliers)


@dataclass(frozen=True)
class BitPlan:
    """The planner's answer: a format per tensor, the size it reaches and the loss it predicts."""

    target_bpw: float
    loss_kind: str
    choices: tuple[TensorChoice, ...]
    losses: dict = field(default_factory=dict, compare=False)   # {tensor: {format: loss}} measured or estimated

    @property
    def params(self) -> int:
        return sum(c.params for c in self.choices)

    @property
    def bits_per_weight(self) -> float:
        return sum(c.bits for c in self.choices) / self.params

    @property
    def predicted_loss(self) -> float:
        return sum(c.loss for c in self.choices)

    def format_plan(self) -> FormatPlan:
        """One exact rule per tensor (the default: the format most tensors take)."""
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c.format] = counts.get(c.format, 0) + 1
        default = max(counts, key=counts.get)
        rules = tuple((c.name, format_from_name(c.format)) for c in self.choices if c.format != default)
        outliers = tuple((c.name, c.outliers) for c in self.choices if c.outliers)
        return FormatPlan(rules, format_from_name(default), f"lowbit plan --target-bpw {self.target_bpw:g}",
                          outliers)

    def summary(self) -> dict:
        by: dict[str, dict] = {}
        for c in self.choices:
            row = by.setdefault(c.option, {"tensors": 0, "params": 0})
            row["tensors"] += 1
            row["params"] += c.params
        return {"target_bpw": self.target_bpw, "bits_per_weight": self.bits_per_weight, "loss": self.loss_kind,
                "predicted_loss": self.predicted_loss, "tensors": len(self.choices), "by_format": by}


def stored_format(fmt: Format, shape: tuple[int, int]) -> Format | None:
    """The format a tensor of `shape` is stored in when `fmt` is asked: a GGUF type whose block does not
    divide the row takes llama.cpp's fallback type (None: it would fall back to float)."""
    from ..formats import GGUFFormat
    from .gguf_mixes import FLOAT_TYPES, fallback

    if not isinstance(fmt, GGUFFormat):
        return fmt
    kind = fallback(fmt.name, int(shape[1]))
    return None if kind in FLOAT_TYPES else GGUFFormat(kind)


def option_name(fmt_name: str, share: float) -> str:
    """How losses and summaries name a (format, outlier share) option: "int3-g64-sym+0.5%"."""
    return f"{fmt_name}+{100 * share:g}%" if share else fmt_name


def sparse_bits_of(share: float, shape) -> int:
    """Stored bits of the kept weights of a dense-and-sparse option (entries: 32-bit index, 16-bit value)."""
    from ..formats.sparse import INDEX_BITS, VALUE_BITS

    return round(share * shape[0] * shape[1]) * (INDEX_BITS + VALUE_BITS)


def tensor_options(fmts: list[Format], shares, shape,
                   beside: tuple[str, ...] | None = None) -> list[tuple[Format, float]]:
    """(stored format, outlier share) options of a tensor: each stored format alone, and each non-GGUF
    one (of `beside`, None: all) with each share."""
    from ..formats import GGUFFormat

    def with_shares(g):
        return not isinstance(g, GGUFFormat) and (beside is None or g.name in beside)

    return [(g, s) for g in _stored(fmts, shape) for s in (0.0, *(shares if with_shares(g) else ()))]


def _stored(fmts: list[Format], shape) -> list[Format]:
    """The distinct formats a tensor of `shape` can be stored in, from the candidates (losses are keyed by these)."""
    out = []
    for f in fmts:
        g = stored_format(f, shape)
        if g is not None and g not in out:
            out.append(g)
    return out


def llama_tensor_types(plan: "BitPlan", family) -> list[str]:
    """llama-quantize --tensor-type-file lines (NAME=type, the GGUF name as an anchored pattern) that give
    each planned tensor its type; ValueError when a choice is not a GGUF type."""
    import re

    from ..formats import GGUFFormat
    from ..models.gguf_names import gguf_name

    lines = []
    for c in plan.choices:
        fmt = format_from_name(c.format)
        if not isinstance(fmt, GGUFFormat):
            raise ValueError(f"{c.name} is planned as {c.format}, not a GGUF type: llama.cpp cannot write it")
        name, _ = gguf_name(f"{c.name}.weight", family)
        lines.append(f"^{re.escape(name)}$={fmt.name.lower()}")
    return lines


def decoder_linears(model, spec) -> list[str]:
    """Every decoder layer's linears, in order (the tensors `lowbit quantize` quantizes by default)."""
    n = len(model.get_submodule(spec.layers))
    return [f"{spec.layers}.{i}.{lin}" for i in range(n) for lin in spec.linears]


def plan_items(names: list[str], shapes: dict[str, tuple[int, int]], losses: dict[str, dict[str, float]],
               config: PlannerConfig) -> tuple[dict, list[list[Option]], int]:
    """The knapsack's instance: ({tensor: its (stored format, share) options}, per tensor its Options (stored
    bits, predicted loss) in that order, the budget in bits). ValueError when the target is below the smallest
    reachable size (named in bits per weight)."""
    fmts = config.candidates()
    params = sum(shapes[n][0] * shapes[n][1] for n in names)
    # per tensor the formats it can take as they will be stored (a GGUF type on a ragged row: llama.cpp's fallback)
    allowed = {n: tensor_options(fmts, config.outlier_shares, shapes[n], config.outlier_beside()) for n in names}
    if empty := [n for n in names if not allowed[n]]:
        raise ValueError(f"no candidate format can store {empty[0]} (shape {tuple(shapes[empty[0]])})")
    items = [[Option(g.storage_bits(shapes[n]) + sparse_bits_of(share, shapes[n]),
                     losses[n][option_name(g.name, share)]) for g, share in allowed[n]] for n in names]
    budget = int(config.target_bpw * params)
    least = smallest(items)
    if least > budget:
        raise ValueError(f"--target-bpw {config.target_bpw:g} is below the smallest size these formats reach: "
                         f"{least / params:.4f} bits per weight")
    return allowed, items, budget


def plan_of(names: list[str], shapes: dict, allowed: dict, items: list[list[Option]], choice: tuple[int, ...],
            config: PlannerConfig, losses: dict) -> BitPlan:
    """The BitPlan of one option index per tensor (in `plan_items`' order)."""
    return BitPlan(config.target_bpw, config.loss, tuple(
        TensorChoice(n, shapes[n][0] * shapes[n][1], allowed[n][j][0].name, items[i][j].size, items[i][j].loss,
                     allowed[n][j][1]) for i, (n, j) in enumerate(zip(names, choice))), losses)


def plan_bits(names: list[str], shapes: dict[str, tuple[int, int]], losses: dict[str, dict[str, float]],
              config: PlannerConfig) -> BitPlan:
    """Solve the knapsack: the least summed loss with Σ stored bits ≤ target_bpw × Σ params.
    ValueError when the target is below the smallest reachable size (named in bits per weight)."""
    allowed, items, budget = plan_items(names, shapes, losses, config)
    return plan_of(names, shapes, allowed, items, solve(items, budget).choice, config, losses)
