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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.calibration import CalibConfig
from .errors import LowbitError
from .formats import Format
from .log import logger
from .methods.awq import AwqConfig, AwqPlan, clips_for, output_error, scaled_hessian, search_layer
from .methods.gptq import GptqConfig, gptq
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if isinstance(self.sink_weight, bool) or not isinstance(self.sink_weight, (int, float)) \
                or not 0 <= self.sink_weight < float("inf"):
            raise ValueError(f"sink weight must be a finite number >= 0, got {self.sink_weight!r}")

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
    reports, plan, timings = [], None, ()
    if config.calibrated:
        plan = AwqPlan(meta={"method": config.method, "config": vars(config.awq).copy(),
                             "format": config.fmt.to_dict(), "family": loaded.spec.family}) \
            if "awq" in config.steps else None
        solve = _calibrated_solve(loaded, config, set(names), reports, plan, samples[:, :1])
        wanted = {"hessian", "mean_abs"} if plan is not None else {"hessian"}
        timings = tuple(_walk(loaded, samples, solve, wanted, offload, progress))
    rest = [n for n in names if not config.calibrated or n == loaded.spec.head]
    for name in tqdm(rest, desc=f"rtn {config.fmt.name}", unit="linear", disable=not progress, leave=False):
        linear = loaded.model.get_submodule(name)
        W_f = linear.weight.detach()
        reports.append(_write(loaded.model, name, name, rtn(W_f, config.fmt, config.rtn), linear.bias, W_f, config.fmt))
    seconds = time.perf_counter() - start
    logger.info("quantized %d linears in %.1f s", len(reports), seconds)
    return QuantizeResult(config, tuple(reports), seconds, plan, timings)


@contextmanager
def _one_thread():
    """GPTQ's column loop is thousands of small tensor ops: intra-op threads only add
    synchronisation (on a busy 2-core machine they made a 1536x576 solve 6x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _walk(loaded: Loaded, samples, solve, wanted, offload, progress):
    from .calibration.walker import walk

    return walk(loaded.model, loaded.spec, samples, solve, wanted, offload=offload, progress=progress)


def sink_hessians(model: torch.nn.Module, layer: torch.nn.Module, spec, first_tokens: torch.Tensor) -> dict:
    """Σ xᵀx over the first position of each sample, per linear of `layer` -> {name: H [in, in]}.

    A position-0 hidden state depends on its token alone (causal attention), so running the
    model as it is now (earlier layers already quantized) on first_tokens [N, 1] gives the
    inputs `layer` sees at position 0, at the cost of N one-token forward passes.
    """
    from .calibration.capture import capture_inputs

    sources = [g.linears[0] for g in spec.groups]
    with capture_inputs(layer, sources, {"hessian"}) as stats:
        model(input_ids=first_tokens, use_cache=False, logits_to_keep=1)
    return {name: stats[g.linears[0]].hessian for g in spec.groups for name in g.linears}


def sink_weighted_hessians(model: torch.nn.Module, layer: torch.nn.Module, spec, stats: dict,
                           first_tokens: torch.Tensor, sink_weight: float) -> dict:
    """{linear: H + (w - 1) Σ x₀ᵀx₀} from the walker's stats of `layer`: each sample's first token
    (the sink) counted w = sink_weight times. Linears sharing an input share one tensor."""
    H = {name: stats[name].hessian for name in spec.linears}
    if sink_weight == 1.0:
        return H
    H0 = sink_hessians(model, layer, spec, first_tokens)
    done = {}
    for name in spec.linears:
        key = id(H[name])
        if key not in done:
            done[key] = H[name] + (sink_weight - 1.0) * H0[name]
        H[name] = done[key]
    return H


def _calibrated_solve(loaded: Loaded, config: QuantizeConfig, names: set[str], reports: list,
                      plan: AwqPlan | None, first_tokens: torch.Tensor):
    """The walker's solve for config.steps: (AWQ search + fold) then GPTQ or RTN per linear."""
    spec, fmt, head_dim = loaded.spec, config.fmt, loaded.dims.head_dim
    use_gptq = "gptq" in config.steps

    def solve(index: int, layer: torch.nn.Module, stats: dict) -> None:
        H = sink_weighted_hessians(loaded.model, layer, spec, stats, first_tokens, config.sink_weight)
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
        for name in spec.linears:
            full = f"{spec.layers}.{index}.{name}"
            if full not in names:
                continue
            linear = layer.get_submodule(name)
            W_f = linear.weight.detach()
            try:
                if use_gptq:
                    with _one_thread():
                        q, st = gptq(W_f, H[name], fmt, block_size=config.gptq.block_size, damp=config.gptq.damp,
                                     act_order=config.gptq.act_order, static_groups=config.gptq.static_groups,
                                     clip=config.gptq.clip)
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
