"""Perplexity and KL divergence of an edited model against the float model, on a few short rows.

The float model's log-probabilities and every decoder layer's input are recorded once; an edit
inside layer `l` is then measured by replaying the model from layer `l` only. Edits (zeroed
weights, fake-quantized linears) are context managers that put the float weights back.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..calibration.capture_tokens import capture_token_inputs, start_at_layer
from ..errors import LowbitError
from ..models.specs import ArchSpec
from .activations import r4


def down_module(model, spec: ArchSpec, layer: int) -> torch.nn.Module:
    return model.get_submodule(f"{spec.layers}.{layer}.{spec.down}")


@contextmanager
def zeroed(model, spec: ArchSpec, coords):
    """Down-projection weights W[layer][row, col] set to 0 inside the block."""
    saved = []
    try:
        for layer, row, col in coords:
            W = down_module(model, spec, layer).weight
            saved.append((W, row, col, W.data[row, col].clone()))
            W.data[row, col] = 0
        yield
    finally:
        for W, row, col, value in reversed(saved):
            W.data[row, col] = value


@contextmanager
def fake_quantized(modules, fmt):
    """Each module's weight replaced by fmt.fake_quantize(weight) inside the block."""
    saved = []
    try:
        for m in modules:
            W = m.weight.data
            saved.append((m, W))
            m.weight.data = fmt.fake_quantize(W.float()).to(W.dtype)
        yield
    finally:
        for m, W in reversed(saved):
            m.weight.data = W


class Probe:
    """The float model's next-token distributions on `rows` [B, T]; scores of edited models against them."""

    @torch.no_grad()
    def __init__(self, model, spec: ArchSpec, rows: torch.Tensor):
        self.model, self.spec, self.rows = model, spec, rows
        n_layers = len(model.get_submodule(spec.layers))
        names = [f"{spec.layers}.{i}" for i in range(n_layers)]
        with capture_token_inputs(model, names) as inputs:
            logits = self._logits()
        self.inputs = [inputs[n][0] for n in names]              # [B, T, d] per layer
        self.ref = F.log_softmax(logits.float(), dim=-1)          # [B, T-1, V]
        self.targets = rows[:, 1:]
        self.nll = float(-self.ref.gather(-1, self.targets[..., None]).mean())
        self.ppl = math.exp(self.nll)

    @property
    def predictions(self) -> int:
        return int(self.targets.numel())

    def _logits(self) -> torch.Tensor:
        return self.model(input_ids=self.rows, use_cache=False).logits[:, :-1]

    @torch.no_grad()
    def score(self, start: int = 0) -> dict:
        """ppl, KL(P_float || P_edited) in nats and the share of changed top-1 predictions.

        `start`: the first layer the edit touches; the layers before it are replayed from the record.
        """
        with start_at_layer(self.model, self.spec, start, self.inputs[start] if start else None):
            lp = F.log_softmax(self._logits().float(), dim=-1)
        nll = float(-lp.gather(-1, self.targets[..., None]).mean())
        if not math.isfinite(nll):
            raise LowbitError("an edited model produced NaN/Inf logits")
        kld = float((self.ref.exp() * (self.ref - lp)).sum(-1).mean())
        changed = float((lp.argmax(-1) != self.ref.argmax(-1)).float().mean())
        return {"ppl": r4(math.exp(nll)), "kld": r4(max(kld, 0.0)), "top1_changed": r4(changed)}
