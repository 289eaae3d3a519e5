"""The one verb: quantize(loaded, config) rewrites a loaded model's linears in place.

Methods compose by configuration: a method name is "+"-joined steps,
  rtn        round to nearest (no calibration; walks the layers directly),
  gptq       GPTQ on each linear's Hessian,
  awq        AWQ scales searched per layer and folded into the model, then RTN (with AWQ's
             clip factors when AwqConfig.clip, the default, else RtnConfig's clip),
  awq+gptq   the same AWQ step, then GPTQ on the scaled weights with the scaled Hessians,
  imatrix    GGUF types only: each type's scale search weighted by the layer's imatrix (mean x²),
  smooth     SmoothQuant's scales (α fixed or searched per group) folded in, then RTN,
  smooth+gptq  the same, then GPTQ on the smoothed weights and Hessians.
Rotations: `rotation` (lowbit.rotations) fuses QuaRot's orthogonal R1/R2 into the float model and
gives down_proj an online Hadamard (R4) before any step; every method then runs on the rotated model.
Activations: `act_plan` gives linears an activation format (lowbit.formats.activation): their
inputs are quantized at run time; a static format's scale comes from the calibration inputs,
so a static plan makes any method calibrated.
What format goes where is a FormatPlan (lowbit.plans): uniform --bits/--group is a plan with a
default, a llama.cpp mix is one exact rule per tensor, a --plan file anything between. A GGUF
type under a calibrated method always takes the imatrix of its input as importance.
Calibrated methods run through the calibration walker: each decoder layer's inputs come
from the already-quantized layers before it; the solve below searches/folds the AWQ scales,
quantizes each linear and writes a QuantLinear back. An LM head (quantize_head) has no
statistics and always gets RTN.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration.walker import walk
from .quantize_config import (CALIBRATED, INPUTS, METHODS, SINK_WEIGHT, WALKS, LinearReport,  # noqa: F401 (re-exported)
                              QuantizeConfig, QuantizeResult)
from .data.calibration import CalibConfig
from .errors import LowbitError
from .formats import Format, GGUFFormat
from .formats.activation import ActFormat
from .log import logger
from .methods.awq import AwqPlan
from .models.load import Loaded
from .nn.qlinear import QuantLinear
from .nn.qweight import attach_quantized_weight
from .rotations.fuse import input_transform_of
from .quantize_rotate import rotate_and_install_kv
from .solve import calibrated_solve, quantize_linear
from .solve_act import SmoothRecord

def planned_formats(loaded: Loaded, config: QuantizeConfig) -> dict[str, Format]:
    """{full module name: Format} of every tensor `config` quantizes, in forward order: the decoder
    linears, the LM head (with quantize_head, or when the plan names it) and the embedding (when
    the plan names it: a GGUF mix's token_embd). LowbitError for a plan rule that names nothing."""
    spec = loaded.spec
    names = [f"{spec.layers}.{i}.{lin}" for i in range(loaded.dims.n_layers) for lin in spec.linears]
    if config.quantize_head:
        names.append(spec.head)
    try:
        planned = config.format_plan.resolve(names, optional=(spec.head, spec.embed))
    except ValueError as e:
        raise LowbitError(str(e)) from None
    return {name: fmt for name, fmt in planned.items() if fmt is not None}


def quantized_names(loaded: Loaded, config: QuantizeConfig) -> list[str]:
    """Full module names of the tensors that `config` quantizes, in forward order."""
    return list(planned_formats(loaded, config))


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
           proxies: tuple = (None, None), act: tuple = (None, None), sparse=None) -> LinearReport:
    """Replace root.<name> by QuantLinear(q, bias, *act) (an nn.Linear; act: its activation format
    and static input scale) or give it the quantized weight in place (an embedding); report the
    weight error."""
    W_f = W_f.detach().float()
    old = root.get_submodule(name)
    if isinstance(old, torch.nn.Linear):
        s_in, s_out = getattr(old, "incoherence_signs", (None, None))   # QuIP's (solve._make_incoherent)
        module = QuantLinear(q, bias, *act, input_transform="hadamard" if s_in is not None else input_transform_of(old),
                             input_signs=s_in, output_signs=s_out, outliers=sparse)
        root.set_submodule(name, module)
        W_dq = module.W_dq
    else:
        attach_quantized_weight(root.get_submodule(name), q)
        W_dq = root.get_submodule(name).weight
    err = (W_dq.float() - W_f).norm() / W_f.norm().clamp_min(1e-30)
    return LinearReport(full_name, tuple(W_f.shape), fmt.name, float(err), *proxies)


@torch.no_grad()
def quantize(loaded: Loaded, config: QuantizeConfig, samples: torch.Tensor | None = None,
             offload: Path | None = None, progress: bool = True, checkpoint: Path | None = None,
             resume: bool = False, workers=None, on_layer_done=None, on_hessian=None) -> QuantizeResult:
    """Quantize `loaded.model` in place by `config`; returns per-linear reports and the time.

    samples: calibration token ids [N, L] (calibration_samples), required by calibrated methods.
    offload: a directory for the walker's activations (None: in memory).
    checkpoint: a directory where the calibrated walk records each finished layer (calibration.resume);
    resume: continue from the layers it holds (LowbitError if they belong to another run).
    workers: a calibration.distributed.Workers: this process walks its share of `samples`, and each
    solve sees the statistics summed over all the processes (every rank ends with the same model).
    on_hessian(full name, H): called with each calibrated linear's input Hessian as the walker sums it.
    """
    start = time.perf_counter()
    if config.calibrated and samples is None:
        raise LowbitError(f"method {config.method} needs calibration samples")
    io = _LayerIO(loaded, on_layer_done)
    if loaded.weights is not None and (config.rotation or config.kv or config.incoherence or config.inputs == "float"):
        raise LowbitError("a lazily loaded model is quantized layer by layer: rotations, KV-cache quantization, "
                          "incoherence and --inputs float need the whole model")
    matrices, spin = rotate_and_install_kv(loaded, config, samples, progress)
    formats = planned_formats(loaded, config)
    spec = loaded.spec
    if spec.head in formats and loaded.model.config.tie_word_embeddings and spec.embed not in formats:
        _untie_head(loaded)
    elif spec.head in formats and spec.embed in formats and loaded.model.config.tie_word_embeddings:
        raise LowbitError(f"{spec.head} is tied to {spec.embed}: plan the embedding alone (the head shares it)")
    reports, plan, timings, used, pending = [], None, (), None, []
    gguf = any(isinstance(f, GGUFFormat) for f in formats.values())

    acts = planned_acts(config, formats, f"{spec.layers}.")
    smoothing = SmoothRecord() if "smooth" in config.steps else None

    def write(layer, name, full, q, W_f, fmt, proxies, act=(None, None), sparse=None):
        args = (layer, name, full, q, layer.get_submodule(name).bias, W_f, fmt, proxies, act, sparse)
        if config.inputs == "float":
            pending.append(args)      # later layers must see this layer's float outputs
        else:
            reports.append(_write(*args))

    if config.calibrated:
        plan = AwqPlan(meta={"method": config.method, "config": vars(config.awq).copy(),
                             "plan": config.format_plan.to_dict(), "family": spec.family}) \
            if "awq" in config.steps else None
        solve = calibrated_solve(spec, loaded.dims.head_dim, config, formats, write, plan, acts, smoothing, on_hessian)
        wanted = {"hessian", "mean_abs"} if plan is not None else {"hessian"}
        if not ({"gptq", "awq", "imatrix"} & set(config.steps)):
            wanted.discard("hessian")     # RTN after smoothing / static scales: no solve needs H
        if gguf:
            wanted.add("sq_mean")     # the imatrix
        if smoothing is not None or config.static_acts:
            wanted.add("absmax")
        if (smoothing is not None and config.smooth.alpha is None) or \
                any(f.static and f.calibration == "percentile" for f in config.act_formats):
            wanted.add("rows")        # α search and percentiles quantize real calibration rows
        used = choose_walk(config, loaded.dims, samples, offload)
        ckpt = _checkpoint(loaded, config, samples, checkpoint, resume, reports)
        mine = samples
        if workers is not None:
            solve, mine = _distributed(solve, wanted, config, samples, workers)
        if loaded.weights is not None and used == "sequential":
            solve = _forgetting_finished(solve)
        timings = tuple(walk(loaded.model, spec, mine, solve, wanted, offload=offload, progress=progress,
                             sequential=used == "sequential", sink_weight=config.sink_weight, checkpoint=ckpt,
                             layer_io=io))
        reports.extend(_write(*args) for args in pending)
    inside = f"{spec.layers}."
    if not config.calibrated and loaded.weights is not None:
        reports.extend(_rtn_by_layer(loaded, config, formats, acts, io, progress))
    rest = [n for n in formats if not (config.calibrated or loaded.weights is not None) or not n.startswith(inside)]
    for name in tqdm(rest, desc="rtn", unit="tensor", disable=not progress, leave=False):
        module = loaded.model.get_submodule(name)
        if loaded.weights is not None:
            io.materialize(name, module)
        W_f = module.weight.detach()
        q = quantize_linear(W_f, formats[name], config)
        reports.append(_write(loaded.model, name, name, q, getattr(module, "bias", None), W_f, formats[name],
                              act=(acts.get(name), None)))
    seconds = time.perf_counter() - start
    logger.info("quantized %d linears in %.1f s", len(reports), seconds)
    return QuantizeResult(config, tuple(reports), seconds, plan, timings, used, smoothing, spin, matrices)


def _forgetting_finished(solve):
    """solve, first dropping the W_dq of the layer's linears already quantized: in the sequential walk
    every sample has passed them when the next group is solved, and a lazily loaded layer is written
    (from its codes) and dropped, never run again. At a 7B model's down_proj that is 0.6 GiB."""
    def run(index, layer, stats):
        for module in layer.modules():
            if isinstance(module, QuantLinear):
                module.forget_dequantized()
        solve(index, layer, stats)
    return run


class _LayerIO:
    """The walker's layer_io: a lazy model's layers read before their walk and dropped after it, each
    finished layer handed to on_layer_done (a streamed output)."""

    def __init__(self, loaded: Loaded, on_layer_done):
        if loaded.weights is not None and on_layer_done is None:
            raise LowbitError("a lazily loaded model drops each layer once it is quantized: give on_layer_done")
        self.loaded, self.on_layer_done = loaded, on_layer_done

    def materialize(self, name: str, module: torch.nn.Module) -> None:
        from .models.lazy import materialize

        materialize(module, name + ".", self.loaded.weights)

    def load(self, index: int, layer: torch.nn.Module) -> None:
        if self.loaded.weights is not None:
            from .models.lazy import release

            # the walk has its first layer's inputs: the embedding is read again when it is written (a tied
            # head too: it holds the same tensor, which would otherwise stay alive through it)
            release(self.loaded.model.get_submodule(self.loaded.spec.embed))
            if self.loaded.model.config.tie_word_embeddings:
                release(self.loaded.model.get_submodule(self.loaded.spec.head))
            self.materialize(f"{self.loaded.spec.layers}.{index}", layer)

    def done(self, index: int, layer: torch.nn.Module) -> None:
        if self.on_layer_done is not None:
            self.on_layer_done(index, layer)
        if self.loaded.weights is not None:
            from .models.lazy import release

            release(layer)


def _rtn_by_layer(loaded: Loaded, config: QuantizeConfig, formats: dict, acts: dict, io: _LayerIO,
                  progress: bool) -> list[LinearReport]:
    """RTN of a lazy model's decoder layers: one linear's float weight in memory at a time, each
    QuantLinear keeping only its codes (the layer is written, never run: its W_dq goes at once)."""
    spec, reports = loaded.spec, []
    layers = loaded.model.get_submodule(spec.layers)
    for index, layer in enumerate(tqdm(layers, desc="rtn", unit="layer", disable=not progress)):
        prefix = f"{spec.layers}.{index}"
        for name in spec.linears:
            full = f"{prefix}.{name}"
            if full not in formats:
                continue                                    # kept float: read with the rest below
            module = layer.get_submodule(name)
            io.materialize(full, module)
            q = quantize_linear(module.weight.detach(), formats[full], config)
            reports.append(_write(layer, name, full, q, module.bias, module.weight, formats[full],
                                  act=(acts.get(full), None)))
            layer.get_submodule(name).forget_dequantized()
            del module, q
        io.materialize(prefix, layer)                       # norms and float linears
        io.done(index, layer)
    return reports


def _distributed(solve, wanted: set[str], config: QuantizeConfig, samples: torch.Tensor, workers):
    """(solve on statistics summed over the processes, this process's samples); LowbitError where a
    step needs the calibration rows themselves, which cannot be summed."""
    from .calibration.distributed import all_reduce_stats

    if "rows" in wanted:
        raise LowbitError("--workers: SmoothQuant's alpha search and percentile activation scales read the "
                          "calibration rows themselves; run them in one process")
    if samples.shape[0] < workers.world:
        raise LowbitError(f"--workers {workers.world} is more than the {samples.shape[0]} calibration samples")
    return (lambda index, layer, stats: solve(index, layer, all_reduce_stats(stats))), \
        samples[workers.share(samples.shape[0])]


def _checkpoint(loaded: Loaded, config: QuantizeConfig, samples: torch.Tensor, root: Path | None, resume: bool,
                reports: list[LinearReport]):
    """The walk's Checkpoint in `root` (None without one): its records are each layer's reports."""
    if root is None:
        if resume:
            raise LowbitError("resume needs the checkpoint directory")
        return None
    if config.inputs == "float":
        raise LowbitError("--inputs float writes every layer back at the end of the walk: it cannot checkpoint "
                          "layers (use the default --inputs quantized)")
    import hashlib
    import platform

    import transformers

    from . import __version__
    from .calibration.resume import Checkpoint

    prefix = loaded.spec.layers + ".{}."

    def save_records(index):
        return [dict(vars(r), shape=list(r.shape)) for r in reports if r.name.startswith(prefix.format(index))]

    def load_records(index, records):
        reports.extend(LinearReport(**dict(r, shape=tuple(r["shape"]))) for r in records)

    fingerprint = {"config": config.to_dict(), "model": loaded.sha256, "layers": loaded.dims.n_layers,
                   "samples": list(samples.shape),
                   "samples_sha256": hashlib.sha256(samples.to(torch.int64).numpy().tobytes()).hexdigest(),
                   "versions": {"lowbit": __version__, "torch": torch.__version__,
                                "transformers": transformers.__version__, "python": platform.python_version()}}
    return Checkpoint.start(root, fingerprint, resume, save_records=save_records, load_records=load_records)


def planned_acts(config: QuantizeConfig, formats: dict[str, Format], inside: str) -> dict[str, ActFormat]:
    """{full linear name: ActFormat} for the quantized linears the activation plan covers: the
    decoder layers' (names starting with `inside`), others (the head) only when a rule names them."""
    if config.act_plan is None:
        return {}
    try:
        acts = config.act_plan.resolve([n for n in formats if n.startswith(inside)],
                                       optional=[n for n in formats if not n.startswith(inside)])
    except ValueError as e:
        raise LowbitError(f"activation {e}") from None
    for name, act in acts.items():
        if act is not None and name not in formats:
            raise LowbitError(f"{name}: an activation format needs a quantized weight")
    return {name: act for name, act in acts.items() if act is not None}


def choose_walk(config: QuantizeConfig, dims, samples: torch.Tensor, offload: Path | None = None) -> str:
    """The walk config.walk asks for; "auto" is sequential unless AWQ, --offload, or the samples'
    intermediates would take over a quarter of the available memory (then two-pass)."""
    if config.walk == "sequential" and offload is not None:
        raise LowbitError("--walk sequential keeps every sample's activations in memory: it cannot --offload")
    if config.walk != "auto":
        return config.walk
    if "awq" in config.steps or "smooth" in config.steps or offload is not None or config.inputs == "float":
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


def memory_budget() -> int:
    """Bytes this process may reach at its peak: what it holds now plus what the machine has available."""
    import psutil

    return available_memory() + int(psutil.Process().memory_info().rss)
