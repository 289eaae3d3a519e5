"""Per-channel K scales that put a per-token K quantizer's error where the queries are small.

A score is q·k. The cache stores k' = k / s (per channel and KV head, after RoPE), quantizes it and reads
back k̂ = s ∘ Q(k'), so the score error is q·(s ∘ δ') = (q ∘ s)·δ'. For a rotation-based quantizer
(TurboQuant) δ' is close to isotropic with E‖δ'‖² proportional to ‖k'‖², hence

    E[(q·δk)²]  ∝  (Σ_j E[q_j²] s_j²) · (Σ_j E[k_j²] / s_j²),

which (Cauchy–Schwarz) is smallest at s_j⁴ ∝ E[k_j²] / E[q_j²]: ALPHA = 1/4. With grouped-query
attention a K head serves several query heads, and E[q_j²] sums over them. For centered K (center_k)
E[k_j²] is K's variance. The scale acts inside the cache, after RoPE, so RoPE's channel pairs need no
common scale (folding a scale into the q/k projections instead would need one per pair).

With pre_rope (K quantized before RoPE, rope.py) the same holds in RoPE's frame: k_j is the key before
RoPE, and the query meets the error turned by the relative angle of the two positions, which mixes the
energies of channels j and j + D/2 (fully for the fast pairs): E[q_j²] is taken as that pair's mean,
which no angle changes. Both sides are then free of the positions measured, so the scales fit any
context; after RoPE they fit the positions they were measured over (1024-token windows by default).

The energies are measured once on calibration text (`measure`) and saved (`save`/`load`): a plan, applied
by the cache (codec.py) as float16 scales, counted in the cache's bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .rope import pair_mean

ALPHA = 0.25
FORMAT = "lowbit-kv-key-stats"
CALIB_SAMPLES, CALIB_SEQ_LEN = 4, 1024      # windows measured by default (`lowbit eval/generate --kv-scale-k`)


@dataclass(frozen=True)
class KeyStats:
    """Per layer, float64 [Hkv, D] after RoPE: q_energy = E[q_j²] summed over the query heads a K head
    serves, k_energy = E[k_j²], k_mean = E[k_j]; k_energy_pre / k_mean_pre the same for K before RoPE
    (None in files written before they were kept); `tokens` measured, `source` the calibration text."""

    q_energy: dict[int, Tensor]
    k_energy: dict[int, Tensor]
    k_mean: dict[int, Tensor]
    tokens: int
    source: str
    k_energy_pre: dict[int, Tensor] | None = None
    k_mean_pre: dict[int, Tensor] | None = None

    def scales(self, centered: bool, alpha: float = ALPHA, pre_rope: bool = False) -> dict[int, Tensor]:
        """{layer: s [Hkv, D]} (float16 values) for K as it is, or centered (its variance); pre_rope: for K
        before RoPE (the queries' energy averaged over each RoPE pair)."""
        if pre_rope and self.k_energy_pre is None:
            raise ValueError(f"these K statistics ({self.source or 'a file'}) hold no K before RoPE (written by an "
                             "older lowbit): measure them again for --kv-pre-rope")
        energy, mean = (self.k_energy_pre, self.k_mean_pre) if pre_rope else (self.k_energy, self.k_mean)
        out = {}
        for layer, q in self.q_energy.items():
            k = energy[layer] - mean[layer] ** 2 if centered else energy[layer]
            out[layer] = key_scales(pair_mean(q) if pre_rope else q, k, alpha)
        return out

    def check(self, layers: int, kv_heads: int, head_dim: int) -> None:
        """ValueError (one line) when these statistics belong to another attention shape."""
        shapes = {tuple(t.shape) for t in self.q_energy.values()}
        if len(self.q_energy) != layers or shapes != {(kv_heads, head_dim)}:
            got = f"{len(self.q_energy)} layers of {sorted(shapes)}"
            raise ValueError(f"K scales measured on another model: {got}, the model has {layers} layers of "
                             f"[{kv_heads}, {head_dim}] (KV heads, head_dim)")


def key_scales(q_energy: Tensor, k_energy: Tensor, alpha: float = ALPHA) -> Tensor:
    """s [H, D] = (E[k²] / E[q²])^alpha per head, over its geometric mean (the scale of s is free: a
    per-token quantizer normalizes it away), rounded to float16 as the cache stores it."""
    floor = 1e-12 * torch.maximum(q_energy.amax(-1, keepdim=True), k_energy.amax(-1, keepdim=True)).clamp_min(1e-30)
    s = (k_energy.clamp_min(floor) / q_energy.clamp_min(floor)) ** alpha
    s = s / s.log().mean(-1, keepdim=True).exp()
    return s.to(torch.float16).to(torch.float32)


def measure(loaded, windows: Tensor, source: str = "", progress: bool = True) -> KeyStats:
    """The q/K energies of `loaded` over token windows [N, T] (every position of every window; a window's
    positions are 0..T−1, as the model numbers them without a cache)."""
    from tqdm.auto import tqdm

    from .diagnose import capture
    from .rope import layer_ropes

    try:
        ropes = layer_ropes(loaded.model, loaded.spec)
    except ValueError:                  # RoPE the cache cannot undo: the statistics after RoPE only
        ropes = None
    sums: dict[int, list[Tensor]] = {}
    tokens = 0
    for ids in tqdm(windows, desc="K scales", unit="window", disable=not progress, leave=False):
        for layer, (q, k, _, _) in capture(loaded, ids).items():
            q, k = q[0].double(), k[0].double()                   # [Hq, T, D], [Hkv, T, D]
            k_pre = ropes[layer].undo(k) if ropes else torch.zeros_like(k)      # positions 0..T−1
            rep = q.shape[0] // k.shape[0]
            q2 = q.pow(2).sum(1).reshape(k.shape[0], rep, -1).sum(1)   # [Hq, D] -> [Hkv, rep, D] -> [Hkv, D]
            acc = sums.setdefault(layer, [0] * 5)
            for i, t in enumerate((q2, k.pow(2).sum(1), k.sum(1), k_pre.pow(2).sum(1), k_pre.sum(1))):
                acc[i] = acc[i] + t
        tokens += ids.numel()
    mean = [{l: a[i] / tokens for l, a in sums.items()} for i in range(5)]
    pre = (mean[3], mean[4]) if ropes else (None, None)
    return KeyStats(mean[0], mean[1], mean[2], tokens, source, *pre)


def measure_text(loaded, text) -> KeyStats:
    """`measure` on CALIB_SAMPLES seeded windows of CALIB_SEQ_LEN tokens (at most the model's context) of
    `text` (a lowbit.data.text.Text; the evaluation text is refused)."""
    from ..data.calibration import CalibConfig
    from ..quantize import calibration_samples

    limit = getattr(loaded.model.config, "max_position_embeddings", None) or CALIB_SEQ_LEN
    windows = calibration_samples(loaded, text, CalibConfig(CALIB_SAMPLES, min(CALIB_SEQ_LEN, limit)))
    return measure(loaded, windows, text.origin)


def save(stats: KeyStats, path: str | Path, model: str = "") -> None:
    from safetensors.torch import save_file

    named = (("q_energy", stats.q_energy), ("k_energy", stats.k_energy), ("k_mean", stats.k_mean),
             ("k_energy_pre", stats.k_energy_pre), ("k_mean_pre", stats.k_mean_pre))
    tensors = {f"{name}.{layer}": t.contiguous() for name, d in named if d is not None for layer, t in d.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "tokens": str(stats.tokens), "source": stats.source,
                                            "model": model, "alpha": json.dumps(ALPHA)})


def load(path: str | Path) -> KeyStats:
    """KeyStats from `save`'s file; ValueError (one line) for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:          # not a safetensors file at all
        raise ValueError(f"{path}: not a K-scales file ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a K-scales file (format {meta.get('format')!r})")
    parts: dict[str, dict[int, Tensor]] = {n: {} for n in ("q_energy", "k_energy", "k_mean", "k_energy_pre", "k_mean_pre")}
    for key, t in tensors.items():
        name, layer = key.rsplit(".", 1)
        if name not in parts:
            raise ValueError(f"{path}: not a K-scales file (tensor {key!r})")
        parts[name][int(layer)] = t
    return KeyStats(parts["q_energy"], parts["k_energy"], parts["k_mean"], int(meta["tokens"]), meta.get("source", ""),
                    parts["k_energy_pre"] or None, parts["k_mean_pre"] or None)
