"""SpinQuant: R1 (residual) and R2 (per head) learned by Cayley SGD on the Stiefel manifold, through
the quantized network, starting from QuaRot's randomized Hadamards.

Each step: the rotated weights are built as differentiable functions of R1, R2 (fuse.rotate_*),
quantized by the weight format with a straight-through estimator (the rounding's gradient taken
as the identity), activations and K/V likewise; the loss is the language-model cross-entropy on
one calibration window; G = ∂loss/∂R, and the Cayley step
    A = G Rᵀ − R Gᵀ (skew-symmetric),   R ← (I + η/2 A)⁻¹ (I − η/2 A) R
stays on the manifold (RᵀR = I up to float64 round-off) and descends: d/dη loss = −|G|² + tr(GᵀRGᵀR) ≤ 0.
The step is η = min(lr, 1/‖A‖₁) (‖·‖₁ the largest column sum of |A|): the reference Cayley SGD's
rule, which bounds each step's rotation whatever the gradient's scale, so lr = 1.5 only acts once
the gradient is small; lr decays linearly to 0 over the steps (SpinQuant's schedule).
SpinQuant learns R for a network whose weights stay in float when GPTQ quantizes them afterwards
(its README: W16A4KV4 rotations for a W4A4KV4 GPTQ model); `weights=True` quantizes them too (RTN).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..formats.activation import ActFormat, fake_quantize_act
from .fuse import (fuse_norms, rotate_down_input, rotate_out_columns, rotate_reader, rotate_value_rows,
                   rotate_writer)


@dataclass(frozen=True)
class SpinConfig:
    """steps of Cayley SGD (one calibration window each), initial learning rate, wall-time budget;
    weights: quantize the weights (STE) during training, not only activations and K/V."""

    steps: int = 100
    lr: float = 1.5
    time_limit: float = 1800.0
    weights: bool = False

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"spin steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"spin lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.time_limit, (int, float)) and self.time_limit > 0):
            raise ValueError(f"spin time_limit must be > 0 seconds, got {self.time_limit!r}")
        if not isinstance(self.weights, bool):
            raise ValueError(f"spin weights must be true or false, got {self.weights!r}")


@dataclass(frozen=True)
class SpinResult:
    R1: Tensor                  # [hidden, hidden] float64
    R2: Tensor | None           # [head_dim, head_dim] float64
    losses: tuple[float, ...]   # the training loss per step
    seconds: float
    stopped_early: bool         # the time limit ended training before `steps`


def cayley_step(R: Tensor, G: Tensor, lr: float) -> Tensor:
    """One Cayley SGD step of R [n, n] (orthogonal, float64) along the gradient G [n, n], of size
    η = min(lr, 1/‖A‖₁)."""
    R, G = R.double(), G.double()
    A = G @ R.T - R @ G.T                                   # skew-symmetric [n, n]
    eta = min(lr, 1.0 / max(float(A.abs().sum(0).max()), 1e-12))
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    return torch.linalg.solve(eye + (eta / 2) * A, (eye - (eta / 2) * A) @ R)


def _ste(x: Tensor, quantized: Tensor) -> Tensor:
    """x's value replaced by `quantized`, its gradient passed through unchanged."""
    return x + (quantized - x).detach()


def _rotated_params(base: dict, spec, n_layers: int, R1: Tensor, R2: Tensor | None, w_fmt) -> dict:
    """{parameter name: tensor} of the rotated (and weight-quantized, STE) model, from the fused
    float parameters `base`; differentiable in R1 and R2."""
    q = (lambda W: W) if w_fmt is None else (lambda W: _ste(W, w_fmt.fake_quantize(W.detach())))
    out = {f"{spec.embed}.weight": rotate_reader(base[f"{spec.embed}.weight"], R1),
           f"{spec.head}.weight": rotate_reader(base[f"{spec.head}.weight"], R1)}
    v_name, o_name = spec.value_out
    for i in range(n_layers):
        p = f"{spec.layers}.{i}."
        for name in spec.residual_readers:
            W = rotate_reader(base[p + name + ".weight"], R1)
            if name == v_name and R2 is not None:
                W = rotate_value_rows(W, R2)
                if p + name + ".bias" in base:
                    out[p + name + ".bias"] = rotate_value_rows(base[p + name + ".bias"], R2)
            out[p + name + ".weight"] = q(W)
        for name in spec.residual_writers:
            W = rotate_writer(base[p + name + ".weight"], R1)
            if name == o_name and R2 is not None:
                W = rotate_out_columns(W, R2)
            out[p + name + ".weight"] = q(W)
            if p + name + ".bias" in base:
                out[p + name + ".bias"] = rotate_reader(base[p + name + ".bias"], R1)
    return out


def learn_rotations(model: nn.Module, spec, dims, samples: Tensor, R1: Tensor, R2: Tensor | None, w_fmt,
                    act: ActFormat | None, config: SpinConfig, prepare=None, progress=None) -> SpinResult:
    """Train R1 (and R2) from (R1, R2) on `samples` [N, L] token ids (step k uses window k mod N),
    through a copy of `model` with fused norms, the online R4, the activation format `act` on every
    decoder linear's input and, when config.weights, `w_fmt` on their weights; prepare(copy) may add
    more (the simulated KV quantizer). `model` itself is not changed. progress(step, loss) is called
    after each step."""
    from torch.func import functional_call

    w_fmt = w_fmt if config.weights else None

    start = time.perf_counter()
    work = copy.deepcopy(model).float().train(False)
    fuse_norms(work, spec)
    rotate_down_input(work, spec)
    if prepare is not None:
        prepare(work)
    handles = []
    if act is not None:
        def quantize_input(_module, args):
            x = args[0]
            return (_ste(x, fake_quantize_act(x.detach(), act)),) + tuple(args[1:])

        for i in range(dims.n_layers):
            for name in spec.linears:     # registered after R4's pre-hook: it quantizes the rotated input
                handles.append(work.get_submodule(f"{spec.layers}.{i}.{name}").register_forward_pre_hook(quantize_input))
    for p in work.parameters():
        p.requires_grad_(False)
    base = {k: v.detach() for k, v in work.named_parameters()}
    R1, R2 = R1.double(), None if R2 is None else R2.double()
    losses, stopped = [], False
    try:
        for step in range(config.steps):
            if time.perf_counter() - start > config.time_limit:
                stopped = True
                break
            lr = config.lr * (1 - step / config.steps)
            r1 = R1.float().requires_grad_(True)
            r2 = None if R2 is None else R2.float().requires_grad_(True)
            ids = samples[step % samples.shape[0]].unsqueeze(0)             # [L] -> [1, L]
            with torch.enable_grad():                  # callers may run under no_grad (quantize does)
                params = _rotated_params(base, spec, dims.n_layers, r1, r2, w_fmt)
                loss = functional_call(work, params, (ids,), {"labels": ids, "use_cache": False}).loss
                loss.backward()
            R1 = cayley_step(R1, r1.grad, lr)
            if R2 is not None:
                R2 = cayley_step(R2, r2.grad, lr)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    finally:
        for h in handles:
            h.remove()
    return SpinResult(R1, R2, tuple(losses), time.perf_counter() - start, stopped)
