"""AWQ (Lin et al., 2023): per-input-channel scales that protect the salient channels.

For each spec group (linears sharing one input x, e.g. q/k/v after the attention norm) the
search tries s = mean|x|^α for α on a grid in [0, 1] and, with `duo` (AutoAWQ's "duo
scaling"), also s = mean|x|^α / w̄^(1−α), where w̄ is the mean over output rows of |W| relative
to its group's absmax; every candidate is normalised by sqrt(max · min). It keeps the s that
minimises the group's output error on the calibration tokens,

    Σ_linears ‖X Wᵀ − X (Q(W·diag(s))·diag(s)⁻¹)ᵀ‖²  =  Σ_linears tr(E H Eᵀ),
    E = W − Q(W·diag(s))·diag(s)⁻¹,  H = Σ xᵀx  (the walker's Hessian statistic),

so it is exact on every captured token without keeping raw activations. α = 0 is s = 1
(plain quantization), so the chosen scales never do worse than no scaling on this measure.
An optional clip search then picks, per row and group of the scaled weight, the shrink
factor minimising that group's part of the output error, e_g H_gg e_gᵀ.

The result is a plan (ScalePlan: scales per layer and group, optional clips); folding it
into the model is a separate, function-preserving step (lowbit.transforms).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import Format, grouping
from lowbit.methods.gptq import proxy_loss as output_error  # tr(E H Eᵀ), the output error on the tokens
from lowbit.models.specs import ArchSpec
from lowbit.transforms.plan import ScalePlan, apply_plan
from lowbit.transforms.scaling import tie_to_source

AwqPlan = ScalePlan            # AWQ's plan is a plain scale plan
apply_awq_plan = apply_plan    # (model, spec, plan): fold the plan's scales, in place
MIN_SALIENCE = 1e-4            # mean|x| floor: dead channels get a finite scale


@dataclass(frozen=True)
class AwqConfig:
    """AWQ options.

    grid: number of α values, linspace(0, 1, grid), >= 2.
    duo: also try the weight-aware candidates mean|x|^α / w̄^(1−α) (twice the search).
    clip: also search per-group clip factors after scaling (on by default, as in AutoAWQ;
        awq+gptq leaves the rounding, and so the clipping, to GPTQ).
    clip_grid, clip_min: the clip factors tried, linspace(1, clip_min, clip_grid).
    clip_sweeps: passes of the clip search over the groups on the whole output error
        (0: each group judged alone, on its diagonal block of H).
    """

    grid: int = 20
    duo: bool = True
    clip: bool = True
    clip_grid: int = 20
    clip_min: float = 0.5
    clip_sweeps: int = 1

    def __post_init__(self) -> None:
        for name, lo in (("grid", 2), ("clip_grid", 1), ("clip_sweeps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"AwqConfig.{name} must be an int >= {lo}, got {v!r}")
        if not isinstance(self.clip, bool):
            raise ValueError(f"AwqConfig.clip must be True or False, got {self.clip!r}")
        if not isinstance(self.duo, bool):
            raise ValueError(f"AwqConfig.duo must be True or False, got {self.duo!r}")
        if isinstance(self.clip_min, bool) or not isinstance(self.clip_min, (int, float)) or not 0 < self.clip_min <= 1:
            raise ValueError(f"AwqConfig.clip_min must be in (0, 1], got {self.clip_min!r}")


def weight_salience(Ws: Sequence[Tensor], group_size: int) -> Tensor:
    """AWQ's w̄ [in]: mean over the output rows of all Ws ([out_i, in]) of |W| / its group's absmax."""
    W = torch.cat([W.detach().float().abs() for W in Ws])  # [Σ out_i, in]
    g = group_size if group_size > 0 else W.shape[1]  # per-channel / per-tensor: a row is a group
    Wg = grouping.to_groups(W, g, pad="zero")  # [out, G, w]
    Wg = Wg / Wg.amax(-1, keepdim=True).clamp_min(1e-6)
    return grouping.from_groups(Wg, g, tuple(W.shape)).mean(0)  # [out, G, w] -> [out, in] -> [in]


def scale_candidates(x_mean: Tensor, grid: int, w_mean: Tensor | None = None) -> list[tuple[float, Tensor]]:
    """(α, s [in]) for α in linspace(0, 1, grid); s = x^α, and with w_mean also x^α / w̄^(1−α)
    (reported as α − 1, so a negative α marks a weight-aware candidate); every s is divided by
    sqrt(max(s) · min(s))."""
    x = x_mean.float().clamp(min=MIN_SALIENCE)
    out = []
    for alpha in torch.linspace(0, 1, grid).tolist():
        s = x.pow(alpha)
        out.append((alpha, s / (s.max() * s.min()).sqrt()))
        if w_mean is not None and alpha < 1.0:  # at α = 1 both are x
            s = (x.pow(alpha) / (w_mean.float().pow(1.0 - alpha) + MIN_SALIENCE)).clamp(min=MIN_SALIENCE)
            out.append((alpha - 1.0, s / (s.max() * s.min()).sqrt()))
    return out


def scaled_fake_quantize(fmt, W: Tensor, s: Tensor) -> Tensor:
    """Q(W·diag(s))·diag(s)⁻¹ for W [out, in], s [in]. A grid whose quantizer weighs input columns
    (a GGUF type with an imatrix) defines fake_quantize_scaled(W, s) to see the scaled inputs too."""
    own = getattr(fmt, "fake_quantize_scaled", None)
    return own(W, s) if own is not None else fmt.fake_quantize(W * s).div_(s)


def search_scales(Ws: list[Tensor], H: Tensor, x_mean: Tensor, fmt: Format | Sequence[Format],
                  grid: int = 20, w_mean: Tensor | None = None) -> tuple[Tensor, dict]:
    """Best scales s [in] for linears Ws (each [out_i, in]) sharing the input with Hessian H [in, in].

    x_mean [in]: mean |x| per input channel; fmt: one format for all Ws, or one per W;
    w_mean [in]: weight_salience, to add the weight-aware candidates (None: x^α only).
    Returns s and {"alpha" (negative: weight-aware, see scale_candidates), "error", "error_unscaled"}.
    """
    fmts = list(fmt) if isinstance(fmt, Sequence) else [fmt] * len(Ws)
    if len(fmts) != len(Ws):
        raise ValueError(f"{len(fmts)} formats for {len(Ws)} linears")
    H = H.float()
    Ws = [W.detach().float() for W in Ws]
    best = None
    for alpha, s in scale_candidates(x_mean, grid, w_mean):
        err = sum(output_error(W, scaled_fake_quantize(f, W, s), H) for W, f in zip(Ws, fmts))
        if alpha == 0.0:
            unscaled = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return s, {"alpha": alpha, "error": err, "error_unscaled": unscaled}


def _block_hessian(H: Tensor, group_size: int) -> Tensor:
    """Diagonal blocks of H [in, in] per scale group -> [G, w, w] (ragged tail zero-padded)."""
    n = H.shape[0]
    w = grouping.group_width(group_size, (1, n))
    G = grouping.n_groups(group_size, n)
    Hp = H.new_zeros(G * w, G * w)
    Hp[:n, :n] = H
    idx = torch.arange(G)
    return Hp.view(G, w, G, w)[idx, :, idx, :]  # [G, w, G, w] -> the G diagonal blocks [G, w, w]


def search_clip(W: Tensor, H: Tensor, fmt: Format, grid: int = 20, clip_min: float = 0.5,
                sweeps: int = 1) -> Tensor | None:
    """Per (row, group) clip factor for W [out, in] -> [out, n_groups].

    First each group alone: the factor minimising e_g H_gg e_gᵀ. Then `sweeps` passes of
    coordinate descent on the whole output error tr(E H Eᵀ): group by group, each row takes the
    factor minimising e_g H_gg e_gᵀ + 2 e_g · (E H)_g,others with the other groups' errors fixed
    (correlated input channels couple the groups). The descent starts from the better of the
    per-group choice and no clipping, and each step can only lower the total, so the result
    is never worse than no clipping on tr(E H Eᵀ).
    None for per-tensor formats (one scale for all rows: nothing to choose per group).
    """
    if fmt.group_size < 0:
        return None
    W = W.detach().float()
    H = H.float()
    shape = fmt.scale_shape(tuple(W.shape))
    factors = torch.linspace(1.0, clip_min, grid)
    # E_f = W - Q(W; f) for every factor: rows and groups quantize independently, so any choice
    # of one factor per (row, group) assembles its error from these slices
    E_f = torch.stack([W - fmt.fake_quantize(W, torch.full(shape, float(f))) for f in factors])  # [F, out, in]
    Hb = _block_hessian(H, fmt.group_size)  # [G, w, w]
    Eg = grouping.to_groups(E_f.flatten(0, 1), fmt.group_size, pad="zero")  # [F*out, in] -> [F*out, G, w]
    Eg = Eg.view(grid, W.shape[0], *Eg.shape[1:]).transpose(1, 2)  # [F, G, out, w]
    err = (Eg @ Hb).mul_(Eg).sum(-1)  # [F, G, out]: e_g H_gg e_gᵀ per factor, group and row
    best = err.argmin(0).T  # [out, G] factor index
    G = best.shape[1]
    if G > 1 and sweeps > 0:
        bounds = [(g * Hb.shape[-1], min((g + 1) * Hb.shape[-1], W.shape[1])) for g in range(G)]
        rows = torch.arange(W.shape[0])
        E = torch.empty_like(W)
        for g, (a, b) in enumerate(bounds):
            E[:, a:b] = E_f[best[:, g], rows, a:b]
        per_row = lambda E: (E @ H).mul_(E).sum(-1)  # noqa: E731 -- [out]: each row's share of tr(E H Eᵀ)
        unclipped = per_row(E_f[0]) < per_row(E)  # rows where no clipping beats the per-group choice
        best[unclipped] = 0
        E[unclipped] = E_f[0][unclipped]
        for _ in range(sweeps):
            for g, (a, b) in enumerate(bounds):
                cross = E @ H[:, a:b] - E[:, a:b] @ H[a:b, a:b]  # [out, w]: the other groups' pull on g
                e = E_f[:, :, a:b]  # [F, out, w]
                total = (e @ H[a:b, a:b]).mul_(e).sum(-1) + 2 * (e * cross).sum(-1)  # [F, out]
                best[:, g] = total.argmin(0)
                E[:, a:b] = E_f[best[:, g], rows, a:b]
    return factors[best]


def group_salience(layer: torch.nn.Module, group, x_mean: Tensor, head_dim: int | None) -> Tensor:
    """mean|x| of a group's input, tied across GQA repeats when its source is a linear."""
    if group.source_kind == "linear":
        return tie_to_source(x_mean, layer.get_submodule(group.source).weight.shape[0], head_dim)
    return x_mean


def search_layer(layer: torch.nn.Module, spec: ArchSpec, hessians: dict[str, Tensor], saliences: dict[str, Tensor],
                 fmt: Format | Mapping[str, Format], config: AwqConfig,
                 head_dim: int | None = None) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """AWQ scales of one decoder layer -> ({group source: s}, {group source: info}).

    hessians / saliences: per linear name, H [in, in] and mean |x| [in] of its input (the
    walker's "hessian" and "mean_abs" statistics); fmt: one format, or one per linear name
    (a GGUF mix gives attn_v a finer type than attn_q). Every group is searched on the layer's
    current (unscaled) weights; the scales of different groups touch different parameters,
    so they can be folded in any order.
    """
    scales, info = {}, {}
    for group in spec.groups:
        first = group.linears[0]
        Ws = [layer.get_submodule(name).weight for name in group.linears]
        x = group_salience(layer, group, saliences[first], head_dim)
        fmts = [fmt[name] for name in group.linears] if isinstance(fmt, Mapping) else fmt
        w = None
        if config.duo:
            size = getattr(fmts[0] if isinstance(fmts, list) else fmts, "group_size", -1)
            w = group_salience(layer, group, weight_salience(Ws, size), head_dim)
        scales[group.source], info[group.source] = search_scales(Ws, hessians[first], x, fmts, config.grid, w)
    return scales, info


def scaled_hessian(H: Tensor, s: Tensor) -> Tensor:
    """Hessian of the input x / s: diag(1/s) H diag(1/s) (same dtype as H)."""
    inv = 1.0 / s.to(H.dtype)
    return H * inv[:, None] * inv[None, :]


def clips_for(layer, spec: ArchSpec, hessians: dict[str, Tensor], scales: dict[str, Tensor],
              fmt: Format | Mapping[str, Format | None], config: AwqConfig) -> dict[str, Tensor]:
    """Clip factors {linear: [out, n_groups]} of the layer's weights as scaled by `scales`
    (not yet folded into `layer`); hessians: H of each linear's unscaled input; fmt: one format,
    or one per linear name (None: kept in float, no clip)."""
    clips = {}
    for group in spec.groups:
        s = scales[group.source]
        H = scaled_hessian(hessians[group.linears[0]], s)
        for name in group.linears:
            f = fmt.get(name) if isinstance(fmt, Mapping) else fmt
            if f is None or f.family == "gguf":  # GGUF types search their own block scales
                continue
            c = search_clip(layer.get_submodule(name).weight.float() * s, H, f, config.clip_grid, config.clip_min,
                            config.clip_sweeps)
            if c is not None:
                clips[name] = c
    return clips
