"""The one verb: quantize(loaded, config) rewrites a loaded model's linears in place.

RTN needs no calibration data, so it walks the spec's layers directly: for each decoder
layer, for each linear the spec names, solve (a pure function of the weight) and write a
QuantLinear back. Calibrated methods plug into the same loop through the calibration
walker, which adds capture → statistics before the solve.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .formats import Format
from .log import logger
from .methods.rtn import RtnConfig, rtn
from .models.load import Loaded
from .nn.qlinear import QuantLinear

METHODS = ("rtn",)


@dataclass(frozen=True)
class QuantizeConfig:
    """What to do to a model: method, format, method options and which linears to skip."""

    fmt: Format
    method: str = "rtn"
    rtn: RtnConfig = field(default_factory=RtnConfig)
    quantize_head: bool = False
    skip: tuple[str, ...] = ()          # fnmatch patterns on full module names kept in float

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")

    def to_dict(self) -> dict:
        return {"method": self.method, "format": self.fmt.to_dict(),
                "rtn": vars(self.rtn).copy(), "quantize_head": self.quantize_head, "skip": list(self.skip)}


@dataclass(frozen=True)
class LinearReport:
    """One quantized linear: where it is, its format, its relative weight error."""

    name: str
    shape: tuple[int, int]
    fmt: str
    rel_error: float                    # ||W_f - W_dq||_F / ||W_f||_F


@dataclass(frozen=True)
class QuantizeResult:
    config: QuantizeConfig
    linears: tuple[LinearReport, ...]
    seconds: float


def quantized_names(loaded: Loaded, config: QuantizeConfig) -> list[str]:
    """Full module names of the linears that `config` quantizes, in forward order."""
    spec = loaded.spec
    names = [f"{spec.layers}.{i}.{lin}" for i in range(loaded.dims.n_layers) for lin in spec.linears]
    if config.quantize_head:
        names.append(spec.head)
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in config.skip)]


def _untie_head(loaded: Loaded) -> None:
    """Quantizing a tied head: the embedding stays float, the head becomes its own tensor."""
    if loaded.dims.tied_embeddings:
        head = loaded.model.get_submodule(loaded.spec.head)
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        loaded.model.config.tie_word_embeddings = False
        logger.info("untied %s from %s: the embedding stays float", loaded.spec.head, loaded.spec.embed)


@torch.no_grad()
def quantize(loaded: Loaded, config: QuantizeConfig, progress: bool = True) -> QuantizeResult:
    """Quantize `loaded.model` in place by `config`; returns per-linear reports and the time."""
    start = time.perf_counter()
    if config.quantize_head:
        _untie_head(loaded)
    reports = []
    names = quantized_names(loaded, config)
    for name in tqdm(names, desc=f"{config.method} {config.fmt.name}", unit="linear",
                     disable=not progress, leave=False):
        linear = loaded.model.get_submodule(name)
        W_f = linear.weight.detach()
        q = rtn(W_f, config.fmt, config.rtn)
        module = QuantLinear(q, linear.bias)
        err = (module.W_dq - W_f.float()).norm() / W_f.float().norm().clamp_min(1e-30)
        loaded.model.set_submodule(name, module)
        reports.append(LinearReport(name, tuple(W_f.shape), config.fmt.name, float(err)))
    seconds = time.perf_counter() - start
    logger.info("quantized %d linears in %.1f s", len(reports), seconds)
    return QuantizeResult(config, tuple(reports), seconds)
