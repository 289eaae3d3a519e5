"""`lowbit plan`: a per-tensor format for every decoder linear that minimises the predicted quality
loss at a size of at most `target_bpw` bits per weight (lowbit's count: codes, scales and zero-points
of the quantized linears, as `lowbit quantize` reports it).

Two steps, kept apart (a search returns a plan; applying it is `lowbit quantize --plan`):
  losses   predicted loss of every (tensor, format): "kld" measures it — the KL divergence against the
           float model on probe rows when that tensor alone is round-to-nearest quantized (what `lowbit
           analyze`'s sensitivity measures); "proxy" estimates it — the Hessian-weighted error
           tr(E H Eᵀ) / n of the same rounding on the same rows (cheap: one pass, no re-evaluation).
           Losses add across tensors (the planner's assumption; bench/plan.py measures how well).
  solve    the multiple-choice knapsack (plans/knapsack.py) over stored sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..formats import Format, format_from_name
from .knapsack import Option, smallest, solve
from .plan import FormatPlan

LOSSES = ("kld", "proxy")
DEFAULT_FORMATS = ("int2-g64-sym-signed", "int3-g64-sym-signed", "int4-g128-sym-signed", "int4-g64-sym-signed",
                   "int6-g64-sym-signed", "int8-g128-sym-signed")   # the signed grid: the best uniform rows


@dataclass(frozen=True)
class PlannerConfig:
    """target_bpw over the quantized linears; candidate formats by name; loss "kld" or "proxy"."""

    target_bpw: float
    formats: tuple[str, ...] = DEFAULT_FORMATS
    loss: str = "kld"

    def __post_init__(self):
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

    def candidates(self) -> list[Format]:
        return [format_from_name(n) for n in self.formats]


@dataclass(frozen=True)
class TensorChoice:
    name: str
    params: int
    format: str
    bits: int                       # stored bits in that format
    loss: float                     # its predicted loss


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
        return FormatPlan(rules, format_from_name(default), f"lowbit plan --target-bpw {self.target_bpw:g}")

    def summary(self) -> dict:
        by: dict[str, dict] = {}
        for c in self.choices:
            row = by.setdefault(c.format, {"tensors": 0, "params": 0})
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


def plan_bits(names: list[str], shapes: dict[str, tuple[int, int]], losses: dict[str, dict[str, float]],
              config: PlannerConfig) -> BitPlan:
    """Solve the knapsack: the least summed loss with Σ stored bits ≤ target_bpw × Σ params.
    ValueError when the target is below the smallest reachable size (named in bits per weight)."""
    fmts = config.candidates()
    params = sum(shapes[n][0] * shapes[n][1] for n in names)
    # per tensor the formats it can take as they will be stored (a GGUF type on a ragged row: llama.cpp's fallback)
    allowed = {n: _stored(fmts, shapes[n]) for n in names}
    if empty := [n for n in names if not allowed[n]]:
        raise ValueError(f"no candidate format can store {empty[0]} (shape {tuple(shapes[empty[0]])})")
    items = [[Option(g.storage_bits(shapes[n]), losses[n][g.name]) for g in allowed[n]] for n in names]
    budget = int(config.target_bpw * params)
    least = smallest(items)
    if least > budget:
        raise ValueError(f"--target-bpw {config.target_bpw:g} is below the smallest size these formats reach: "
                         f"{least / params:.4f} bits per weight")
    sol = solve(items, budget)
    choices = tuple(TensorChoice(n, shapes[n][0] * shapes[n][1], allowed[n][j].name, items[i][j].size,
                                 items[i][j].loss) for i, (n, j) in enumerate(zip(names, sol.choice)))
    return BitPlan(config.target_bpw, config.loss, choices, losses)


@torch.no_grad()
def measured_losses(model, spec, probe, names: list[str], fmts: list[Format], progress: bool = True) -> dict:
    """{tensor: {stored format: KLD}} with that tensor alone fake-quantized (RTN), replayed from its layer."""
    from ..analysis.probe import fake_quantized

    out = {}
    bar = tqdm(total=len(names) * len(fmts), desc="plan: per-tensor KLD", unit="eval", disable=not progress)
    for name in names:
        layer = int(name.removeprefix(spec.layers + ".").split(".")[0])
        module = model.get_submodule(name)
        out[name] = {}
        for f in _stored(fmts, tuple(module.weight.shape)):
            with fake_quantized([module], f):
                out[name][f.name] = probe.score(layer)["kld"]
            bar.update()
    bar.close()
    return out


@torch.no_grad()
def proxy_losses(model, rows: torch.Tensor, names: list[str], fmts: list[Format]) -> dict:
    """{tensor: {format: tr(E H Eᵀ) / n}}: H = Σ x xᵀ of the tensor's inputs on `rows`, n their count,
    E = W − RTN(W) — the mean squared error the rounding adds to the tensor's outputs."""
    H, count, hooks = {}, {}, []

    def hook(name):
        def fn(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()          # [B, T, d_in] -> [B·T, d_in]
            H[name] = H.get(name, 0) + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        model(input_ids=rows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name in names:
        W = model.get_submodule(name).weight.float()
        out[name] = {}
        for f in _stored(fmts, tuple(W.shape)):
            E = (W - f.fake_quantize(W)).double()                          # [d_out, d_in]
            out[name][f.name] = float(((E @ H[name]) * E).sum() / count[name])          # tr(E H Eᵀ) / n
    return out
