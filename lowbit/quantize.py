"""The one verb: quantize(loaded, config) rewrites a loaded model's linears in place.

Methods compose by configuration: a method name is "+"-joined steps,
  rtn        round to nearest (no calibration; walks the layers directly),
  gptq       GPTQ on each linear's Hessian,
  awq        AWQ scales searched per layer and folded into the model, then RTN (with AWQ's
             clip factors when AwqConfig.clip, the default, else RtnConfig's clip),
  awq+gptq   the same AWQ step, then GPTQ on the scaled weights with the scaled Hessians.
Calibrated methods run through the calibration walker: each decoder layer's inputs come
from the already-quantized layers before it; the solve below searches/folds the AWQ scales,
quantizes each linear and writes a QuantLinear back. An LM head (quantize_head) has no
statistics and always gets RTN.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration.walker import walk
from .data.calibration import CalibConfig
from .errors import LowbitError
from .formats import Format
from .log import logger
from .methods.awq import AwqConfig, AwqPlan, clips_for, output_error, scaled_hessian, search_layer
from .methods.gptq import GptqConfig, gptq_shared
from .methods.rtn import RtnConfig, rtn
from .models.load import Loaded
from .nn.qlinear import QuantLinear
from .transforms.scaling import fold_scales

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
CALIBRATED = ("gptq", "awq", "awq+gptq")
# The first token of a sequence is an attention sink with a hidden state unlike any other;
# in Σ xᵀx it is 1 token in seq_len, yet every later token attends to it. GPTQ trading its
# error for the others' made SmolLM2 W4 g64 worse than RTN (4 windows: 42.4 vs 36.0, FP 24.2);
# counting each sample's first token this many times gave 30.1.
SINK_WEIGHT = 100.0
WALKS = ("auto", "sequential", "two-pass")   # calibration/walker.py; auto: choose_walk


@dataclass(frozen=True)
class QuantizeConfig:
    """What to do to a model: method, format, method options and which linears to skip."""

    fmt: Format
    method: str = "rtn"
    rtn: RtnConfig = field(default_factory=RtnConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    awq: AwqConfig = field(default_factory=AwqConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    sink_weight: float = SINK_WEIGHT    # weight of each sample's first token in the Hessians
    quantize_head: bool = False
    skip: tuple[str, ...] = ()          # fnmatch patterns on full module names kept in float
    walk: str = "auto"                  # one of WALKS

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if isinstance(self.sink_weight, bool) or not isinstance(self.sink_weight, (int, float)) \
                or not 0 <= self.sink_weight < float("inf"):
            raise ValueError(f"sink weight must be a finite number >= 0, got {self.sink_weight!r}")
        if self.walk not in WALKS:
            raise ValueError(f"unknown walk {self.walk!r} (known: {', '.join(WALKS)})")
        if self.walk == "sequential" and "awq" in self.steps:
            raise ValueError("AWQ needs the two-pass walk (its v → o scales fold into v before v is quantized)")

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(self.method.split("+"))

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED

    def to_dict(self) -> dict:
        d = {"method": self.method, "format": self.fmt.to_dict(), "rtn": vars(self.rtn).copy(),
             "quantize_head": self.quantize_head, "skip": list(self.skip)}
        if "gptq" in self.steps:
            d["gptq"] = vars(self.gptq).copy()
        if "awq" in self.steps:
            d["awq"] = vars(self.awq).copy()
        if self.calibrated:
            d["calibration"] = vars(self.calib).copy()
            d["sink_weight"] = self.sink_weight
            d["walk"] = self.walk
        return d


@dataclass(frozen=True)
class LinearReport:
    """One quantized linear: where it is, its format, its relative weight error."""

    name: str
    shape: tuple[int, int]
    fmt: str
    rel_error: float                    # ||W_f - W_dq||_F / ||W_f||_F (W_f after AWQ scaling)
    proxy_loss: float | None = None     # tr(E H Eᵀ) on the calibration inputs (calibrated methods)
    rtn_proxy_loss: float | None = None  # the same for plain RTN of the unscaled weight


@dataclass(frozen=True)
class QuantizeResult:
    config: QuantizeConfig
    linears: tuple[LinearReport, ...]
    seconds: float
    plan: AwqPlan | None = None         # the AWQ scales (and clips) that were folded in
    timings: tuple = ()                 # walker LayerTiming per layer (calibrated methods)
    walk: str | None = None             # the walk used (calibrated methods): "sequential" | "two-pass"


def quantized_names(loaded: Loaded, config: QuantizeConfig) -> list[str]:
    """Full module names of the linears that `config` quantizes, in forward order."""
    spec = loaded.spec
    names = [f"{spec.layers}.{i}.{lin}" for i in range(loaded.dims.n_layers) for lin in spec.linears]
    if config.quantize_head:
        names.append(spec.head)
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in config.skip)]


def calibration_samples(loaded: Loaded, text, calib: CalibConfig) -> torch.Tensor:
    """[samples, seq_len] token windows of `text` (a lowbit.data.text.Text) for `loaded`'s tokenizer."""
    from .data.calibration import sample_calibration
    from .eval.perplexity import tokenize

    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and calib.seq_len > limit:
        raise LowbitError(f"--seq-len {calib.seq_len} is longer than the model's context ({limit} positions)")
    return sample_calibration(tokenize(loaded.tokenizer, text.text), text, calib)


def _untie_head(loaded: Loaded) -> None:
    """Quantizing a tied head: the embedding stays float, the head becomes its own tensor."""
    if loaded.dims.tied_embeddings:
        head = loaded.model.get_submodule(loaded.spec.head)
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        loaded.model.config.tie_word_embeddings = False
        logger.info("untied %s from %s: the embedding stays float", loaded.spec.head, loaded.spec.embed)


def _write(root: torch.nn.Module, name: str, full_name: str, q, bias, W_f: torch.Tensor, fmt: Format,
           proxies: tuple = (None, None)) -> LinearReport:
    """Replace root.<name> by QuantLinear(q, bias); report the weight error."""
    module = QuantLinear(q, bias)
    err = (module.W_dq - W_f.float()).norm() / W_f.float().norm().clamp_min(1e-30)
    root.set_submodule(name, module)
    return LinearReport(full_name, tuple(W_f.shape), fmt.name, float(err), *proxies)


@torch.no_grad()
def quantize(loaded: Loaded, config: QuantizeConfig, samples: torch.Tensor | None = None,
             offload: Path | None = None, progress: bool = True) -> QuantizeResult:
    """Quantize `loaded.model` in place by `config`; returns per-linear reports and the time.

    samples: calibration token ids [N, L] (calibration_samples), required by calibrated methods.
    offload: a directory for the walker's activations (None: in memory).
    """
    start = time.perf_counter()
    if config.calibrated and samples is None:
        raise LowbitError(f"method {config.method} needs calibration samples")
    if config.quantize_head:
        _untie_head(loaded)
    names = quantized_names(loaded, config)
    reports, plan, timings, used = [], None, (), None
    if config.calibrated:
        plan = AwqPlan(meta={"method": config.method, "config": vars(config.awq).copy(),
                             "format": config.fmt.to_dict(), "family": loaded.spec.family}) \
            if "awq" in config.steps else None
        solve = _calibrated_solve(loaded, config, set(names), reports, plan)
        wanted = {"hessian", "mean_abs"} if plan is not None else {"hessian"}
        used = choose_walk(config, loaded.dims, samples, offload)
        timings = tuple(walk(loaded.model, loaded.spec, samples, solve, wanted, offload=offload, progress=progress,
                             sequential=used == "sequential", sink_weight=config.sink_weight))
    rest = [n for n in names if not config.calibrated or n == loaded.spec.head]
    for name in tqdm(rest, desc=f"rtn {config.fmt.name}", unit="linear", disable=not progress, leave=False):
        linear = loaded.model.get_submodule(name)
        W_f = linear.weight.detach()
        reports.append(_write(loaded.model, name, name, rtn(W_f, config.fmt, config.rtn), linear.bias, W_f, config.fmt))
    seconds = time.perf_counter() - start
    logger.info("quantized %d linears in %.1f s", len(reports), seconds)
    return QuantizeResult(config, tuple(reports), seconds, plan, timings, used)


def choose_walk(config: QuantizeConfig, dims, samples: torch.Tensor, offload: Path | None = None) -> str:
    """The walk config.walk asks for; "auto" is sequential unless AWQ, --offload, or the samples'
    intermediates would take over a quarter of the available memory (then two-pass)."""
    if config.walk == "sequential" and offload is not None:
        raise LowbitError("--walk sequential keeps every sample's activations in memory: it cannot --offload")
    if config.walk != "auto":
        return config.walk
    if "awq" in config.steps or offload is not None:
        return "two-pass"
    # alive per token while a group is solved: the MLP's product and a few hidden-size tensors
    need = samples.numel() * 4 * (dims.intermediate + 4 * dims.hidden)
    available = available_memory()
    walk = "sequential" if need <= available / 4 else "two-pass"
    logger.info("walk: %s (the sequential walk would hold ~%.1f GiB of %.1f GiB available)", walk,
                need / 2**30, available / 2**30)
    return walk


def available_memory() -> int:
    """Bytes of memory available to new allocations."""
    import psutil

    return int(psutil.virtual_memory().available)


def _calibrated_solve(loaded: Loaded, config: QuantizeConfig, names: set[str], reports: list,
                      plan: AwqPlan | None):
    """The walker's solve for config.steps: (AWQ search + fold) then GPTQ or RTN per linear."""
    spec, fmt, head_dim = loaded.spec, config.fmt, loaded.dims.head_dim
    use_gptq = "gptq" in config.steps

    def solve(index: int, layer: torch.nn.Module, stats: dict) -> None:
        H = {name: st.hessian for name, st in stats.items()}   # sink-weighted by the walker
        H_orig, s_of, clips = dict(H), {}, {}
        if plan is not None:
            try:
                saliences = {name: stats[name].mean_abs for name in spec.linears}
                scales, _ = search_layer(layer, spec, H, saliences, fmt, config.awq, head_dim)
                if config.awq.clip and not use_gptq:
                    clips = clips_for(layer, spec, H, scales, fmt, config.awq)
                for group in spec.groups:
                    s = scales[group.source]
                    fold_scales(layer, group, s, norm_offset=spec.norm_offset, head_dim=head_dim)
                    H_group = scaled_hessian(H[group.linears[0]], s)  # the input is now x / s
                    H.update({name: H_group for name in group.linears})
                    s_of.update({name: s for name in group.linears})
            except ValueError as e:
                raise LowbitError(f"layer {index}: AWQ: {e}") from None
            plan.scales[index] = scales
            if clips:
                plan.clips[index] = clips
        todo = [name for name in stats if f"{spec.layers}.{index}.{name}" in names]  # whole layer or one group
        solved = _gptq_by_input(index, layer, todo, H, config) if use_gptq else {}
        for name in todo:
            full = f"{spec.layers}.{index}.{name}"
            linear = layer.get_submodule(name)
            W_f = linear.weight.detach()
            try:
                if use_gptq:
                    q, st = solved[name]
                    loss, rtn_loss = st.proxy_loss, st.rtn_proxy_loss
                else:
                    q = fmt.quantize(W_f, clips[name]) if name in clips else rtn(W_f, fmt, config.rtn)
                    loss = output_error(W_f, fmt.dequantize(q), H[name].float())
                if name in s_of:  # RTN's loss is that of the weight before the AWQ scaling
                    W_0 = W_f.float() / s_of[name]
                    rtn_loss = output_error(W_0, fmt.fake_quantize(W_0), H_orig[name].float())
            except ValueError as e:
                raise LowbitError(f"layer {index} {name}: {e}") from None
            reports.append(_write(layer, name, full, q, linear.bias, W_f, fmt, (loss, rtn_loss)))

    return solve


def _gptq_by_input(index: int, layer: torch.nn.Module, names: list[str], H: dict, config: QuantizeConfig) -> dict:
    """GPTQ of the named linears, one solve per shared input (same H tensor): {name: (QTensor, GptqStats)}."""
    by_input: dict[int, list[str]] = {}
    for name in names:
        by_input.setdefault(id(H[name]), []).append(name)
    out, g = {}, config.gptq
    for group in by_input.values():
        try:
            # with the process's intra-op threads: nothing else runs while a group is solved
            results = gptq_shared([layer.get_submodule(n).weight for n in group], H[group[0]], config.fmt,
                                  block_size=g.block_size, damp=g.damp, act_order=g.act_order,
                                  static_groups=g.static_groups, clip=g.clip)
        except ValueError as e:
            raise LowbitError(f"layer {index} {', '.join(group)}: {e}") from None
        out.update(zip(group, results))
    return out
