"""The calibration walker: capture → statistics → solve → write back, one decoder layer at a time.

Convention: each layer's statistics come from inputs produced by the layers before it *in
their quantized form* (the walker re-runs every layer after its solve and feeds those
outputs on), so each solve sees the activations the quantized model will really see.
Only one layer, its statistics and the calibration activations are in memory at a time;
with `offload`, the activations live on disk instead.

Two ways to walk a layer:
  two-pass    capture every group's inputs with the float layer, solve them all, then re-run
              the quantized layer for the next layer's inputs (AWQ needs this: its v → o
              scales fold into v before v is quantized);
  sequential  one forward: each sample pauses at every group until the group is solved, then
              goes on through its quantized linears (calibration/sequential.py). Half the
              forward work; needs every sample's intermediates in memory, so no offload.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..log import logger
from ..models.specs import ArchSpec
from .capture import capture_inputs
from .sequential import walk_layer
from .stats import InputStats

# solve(layer_index, layer_module, {linear_name: InputStats}) quantizes the named linears in
# place: all the layer's linears (two-pass), or one group's (sequential)
Solve = Callable[[int, torch.nn.Module, dict[str, InputStats]], None]


class ActivationStore:
    """Per-sample hidden states [1, L, d], in memory or (offload) as files in a directory."""

    def __init__(self, offload: Path | None = None):
        self._items: list = []
        self._dir = Path(tempfile.mkdtemp(prefix="acts-", dir=offload)) if offload else None

    def append(self, h: torch.Tensor) -> None:
        if self._dir is None:
            self._items.append(h)
        else:
            path = self._dir / f"{len(self._items)}.pt"
            torch.save(h, path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        for item in self._items:
            yield item if self._dir is None else torch.load(item, weights_only=True)   # our own tensors; never pickle

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@dataclass(frozen=True)
class LayerTiming:
    layer: int
    capture_seconds: float
    solve_seconds: float
    forward_seconds: float


def _first_layer_inputs(model, spec: ArchSpec, samples: torch.Tensor, store: ActivationStore) -> list[dict]:
    """Layer-0 inputs for every sample and the keyword arguments each layer receives.

    Every decoder layer is replaced by a stub that records its arguments and passes the
    hidden states through, so the model's own code builds position embeddings and the
    (per layer type) attention masks; the stubbed model costs one embedding lookup.
    """
    layers = model.get_submodule(spec.layers)
    kwargs: list[dict] = [{} for _ in layers]
    first: list[torch.Tensor] = []

    def stub(index):
        def forward(hidden_states, *args, **kw):
            if args:
                raise LowbitError(f"{spec.family}: decoder layers get positional arguments; the walker needs keywords")
            if index == 0:
                first.append(hidden_states.detach())
            kwargs[index] = kw
            if index == len(layers) - 1:
                raise _Stop                     # the final norm and head are not needed (nor loaded, when lazy)
            return (hidden_states,) if spec.layer_returns_tuple else hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        with torch.no_grad():
            for row in samples:
                try:
                    model(input_ids=row[None], use_cache=False, logits_to_keep=1)
                except _Stop:
                    pass
                store.append(first.pop())
    finally:
        for layer in layers:
            del layer.forward                        # back to the class's forward
    causal_skip = getattr(model.config, "_attn_implementation", None) == "sdpa"
    for kw in kwargs:
        # a cache object reused across calls piles up keys: every sample must see only itself
        kw.update(past_key_values=None, use_cache=False)
        if causal_skip and _plain_causal(kw.get("attention_mask")):
            # SDPA given no mask takes its causal path, which skips the masked half of the
            # scores (same outputs; a test checks it); sliding-window masks stay
            kw["attention_mask"] = None
    return kwargs


class _Stop(Exception):
    """Raised by the last stub layer: the forward has given every layer its arguments."""


def _plain_causal(mask) -> bool:
    """Whether `mask` is a boolean [1, 1, L, L] lower-triangular causal mask (no padding or window)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[:2] != (1, 1):
        return False
    L = mask.shape[-1]
    return mask.shape[-2] == L and torch.equal(mask[0, 0], torch.ones(L, L, dtype=torch.bool).tril())


def _run_layer(layer, spec: ArchSpec, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(h, **kwargs)
    return out[0] if spec.layer_returns_tuple else out


@torch.no_grad()
def walk(model, spec: ArchSpec, samples: torch.Tensor, solve: Solve, wanted: set[str],
         offload: Path | None = None, progress: bool = True, sequential: bool = False,
         sink_weight: float = 1.0, checkpoint=None, layer_io=None) -> list[LayerTiming]:
    """Quantize `model` layer by layer with `solve`, using calibration `samples` [N, L].

    For each layer: capture the inputs of the first linear of each spec group (the others in
    the group read the same tensor) into InputStats with the `wanted` statistics (in H, each
    sample's first token counted sink_weight times), call solve, and produce the next layer's
    inputs from the now-quantized layer: two passes, or one (`sequential`, module docstring).
    checkpoint: a calibration.resume.Checkpoint; its finished layers are restored instead of walked,
    and each layer walked here is recorded in it.
    layer_io: an object with load(index, layer) (called before the layer is walked: a lazy model reads its
    weights) and done(index, layer) (after: a streamed output writes it, a lazy model drops it).
    """
    if sequential and offload is not None:
        raise LowbitError("the sequential walk keeps every sample's activations in memory: it cannot offload")
    n, length = samples.shape
    hidden = model.config.hidden_size
    logger.info("calibration: %d samples x %d tokens; activations %.0f MiB x 2 (%s)", n, length,
                n * length * hidden * 4 / 2**20, f"offloaded to {offload}" if offload else "in memory")
    inputs = ActivationStore(offload)
    timings: list[LayerTiming] = []
    try:
        kwargs = _first_layer_inputs(model, spec, samples, inputs)
        layers = model.get_submodule(spec.layers)
        start_at = 0
        restored = checkpoint.restore(layers, layer_io.done if layer_io is not None else None) \
            if checkpoint is not None else None
        if restored is not None:
            if len(restored) != n:
                raise LowbitError(f"the checkpoint holds {len(restored)} samples' activations, this run has {n}")
            inputs.close()
            inputs = ActivationStore(offload)
            for h in restored:
                inputs.append(h)
            start_at = checkpoint.finished
        bar = tqdm(list(enumerate(layers))[start_at:], desc="layers", unit="layer", disable=not progress,
                   initial=start_at, total=len(layers))
        for index, layer in bar:
            if layer_io is not None:
                layer_io.load(index, layer)
            if sequential:
                inputs, timing = _sequential_layer(layer, spec, index, inputs, kwargs[index], solve, wanted,
                                                   sink_weight)
                timings.append(timing)
                bar.set_postfix(capture=f"{timing.capture_seconds:.1f}s", solve=f"{timing.solve_seconds:.1f}s")
                if checkpoint is not None:
                    checkpoint.layer_done(index, layer, inputs)
                if layer_io is not None:
                    layer_io.done(index, layer)
                continue
            start = time.perf_counter()
            sources = [g.linears[0] for g in spec.groups]
            try:
                with capture_inputs(layer, sources, wanted, sink_weight) as captured:
                    for h in inputs:
                        _run_layer(layer, spec, h, kwargs[index])
            except FloatingPointError as e:
                raise LowbitError(f"layer {index}: {e} (inputs of {', '.join(sources)})") from None
            stats = {name: captured[g.linears[0]] for g in spec.groups for name in g.linears}
            captured_at = time.perf_counter()
            solve(index, layer, stats)
            solved_at = time.perf_counter()
            outputs = ActivationStore(offload)
            for h in inputs:
                out = _run_layer(layer, spec, h, kwargs[index])
                if not torch.isfinite(out).all():
                    raise LowbitError(f"layer {index}: the quantized layer produces NaN/Inf")
                outputs.append(out)
            inputs.close()
            inputs = outputs
            timings.append(LayerTiming(index, captured_at - start, solved_at - captured_at,
                                       time.perf_counter() - solved_at))
            if checkpoint is not None:
                checkpoint.layer_done(index, layer, inputs)
            if layer_io is not None:
                layer_io.done(index, layer)
            bar.set_postfix(capture=f"{captured_at - start:.1f}s", solve=f"{solved_at - captured_at:.1f}s")
    finally:
        inputs.close()
    return timings


def _sequential_layer(layer, spec: ArchSpec, index: int, inputs: ActivationStore, kwargs: dict, solve: Solve,
                      wanted: set[str], sink_weight: float) -> tuple[ActivationStore, LayerTiming]:
    """One layer of the sequential walk: its outputs (the next inputs) and its timing."""
    try:
        outs, capture, solving, tail = walk_layer(
            layer, spec.groups, list(inputs), lambda h: _run_layer(layer, spec, h, kwargs),
            lambda stats: solve(index, layer, stats), wanted, sink_weight)
    except FloatingPointError as e:
        raise LowbitError(f"layer {index}: {e} (inputs of {', '.join(g.linears[0] for g in spec.groups)})") from None
    inputs.close()
    outputs = ActivationStore()
    for out in outs:
        if not torch.isfinite(out).all():
            raise LowbitError(f"layer {index}: the quantized layer produces NaN/Inf")
        outputs.append(out)
    return outputs, LayerTiming(index, capture, solving, tail)
