"""The calibration walker: capture → statistics → solve → write back, one decoder layer at a time.

Convention: each layer's statistics come from inputs produced by the layers before it *in
their quantized form* (the walker re-runs every layer after its solve and feeds those
outputs on), so each solve sees the activations the quantized model will really see.
Only one layer, its statistics and the calibration activations are in memory at a time;
with `offload`, the activations live on disk instead.
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
from .stats import InputStats

# solve(layer_index, layer_module, {linear_name: InputStats}) quantizes the layer in place
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
            yield item if self._dir is None else torch.load(item)

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
            return (hidden_states,) if spec.layer_returns_tuple else hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        with torch.no_grad():
            for row in samples:
                model(input_ids=row[None], use_cache=False, logits_to_keep=1)
                store.append(first.pop())
    finally:
        for layer in layers:
            del layer.forward                        # back to the class's forward
    for kw in kwargs:
        # a cache object reused across calls piles up keys: every sample must see only itself
        kw.update(past_key_values=None, use_cache=False)
    return kwargs


def _run_layer(layer, spec: ArchSpec, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(h, **kwargs)
    return out[0] if spec.layer_returns_tuple else out


@torch.no_grad()
def walk(model, spec: ArchSpec, samples: torch.Tensor, solve: Solve, wanted: set[str],
         offload: Path | None = None, progress: bool = True) -> list[LayerTiming]:
    """Quantize `model` layer by layer with `solve`, using calibration `samples` [N, L].

    For each layer: capture the inputs of the first linear of each spec group (the others in
    the group read the same tensor) into InputStats with the `wanted` statistics, call
    solve, then run the now-quantized layer to produce the next layer's inputs.
    """
    n, length = samples.shape
    hidden = model.config.hidden_size
    logger.info("calibration: %d samples x %d tokens; activations %.0f MiB x 2 (%s)", n, length,
                n * length * hidden * 4 / 2**20, f"offloaded to {offload}" if offload else "in memory")
    inputs = ActivationStore(offload)
    timings: list[LayerTiming] = []
    try:
        kwargs = _first_layer_inputs(model, spec, samples, inputs)
        layers = model.get_submodule(spec.layers)
        bar = tqdm(list(enumerate(layers)), desc="layers", unit="layer", disable=not progress)
        for index, layer in bar:
            start = time.perf_counter()
            sources = [g.linears[0] for g in spec.groups]
            try:
                with capture_inputs(layer, sources, wanted) as captured:
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
            bar.set_postfix(capture=f"{captured_at - start:.1f}s", solve=f"{solved_at - captured_at:.1f}s")
    finally:
        inputs.close()
    return timings
