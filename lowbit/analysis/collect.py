"""One pass of the model over the analysis sequences, keeping the statistics the detectors read.

Nothing here decides what is an outlier: it only runs the model under the capture context
managers of lowbit.calibration and returns plain tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..calibration.capture import capture_inputs, capture_outputs
from ..calibration.capture_tokens import capture_token_inputs
from ..calibration.stats import InputStats
from ..data.calibration import CalibConfig, sample_calibration
from ..errors import LowbitError
from ..log import logger
from ..models.specs import ArchSpec

MEMORY_LIMIT = 6 * 2**30           # per-token activations kept in memory at most


def check_spec(model: torch.nn.Module, spec: ArchSpec) -> None:
    """One clear error when the spec does not match the model (a missing down projection first)."""
    layers = model.get_submodule(spec.layers)
    down = getattr(spec, "down", None)
    if not down:
        raise LowbitError(f"the {spec.family} spec names no down projection: super-weight analysis needs one")
    for path in [down] + [n for n in spec.linears if n != down]:
        try:
            module = layers[0].get_submodule(path)
        except AttributeError:
            what = "down projection" if path == down else "linear"
            raise LowbitError(f"the {spec.family} spec's {what} {path!r} is not a module of "
                              f"{spec.layers}.0 in this model") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise LowbitError(f"{spec.layers}.0.{path} has no 2-D weight: is it a float model's linear?")


def make_rows(tokenizer, text, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[samples, seq_len] token ids: seeded windows of the text, each after the BOS token when there is one."""
    ids = torch.as_tensor(tokenizer(text.text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    if ids.numel() < body + 1:
        need = f"{body} text tokens" + (" + BOS" if bos is not None else "")
        raise LowbitError(f"text {text.origin} has {ids.numel()} tokens, too short for --seq-len {seq_len} "
                          f"({need}, plus one); pass a longer --text or a smaller --seq-len")
    windows = sample_calibration(ids, text, CalibConfig(samples=samples, seq_len=body, seed=seed,
                                                        allow_eval_text=True))
    if bos is None:
        return windows
    return torch.cat([torch.full((samples, 1), bos, dtype=torch.long), windows], dim=1)


def token_texts(tokenizer, rows: torch.Tensor) -> list[list[str]]:
    return [[tokenizer.decode([int(i)]) for i in row] for row in rows]


@dataclass
class DownStats:
    """Per layer, per token of the down projection: the input's largest |x| (value, channel), and y."""

    in_val: torch.Tensor            # [tokens] signed x at its largest |x|
    in_arg: torch.Tensor            # [tokens] channel of it
    out: torch.Tensor               # [tokens, hidden]


@dataclass
class Collected:
    rows: torch.Tensor                                   # [N, L]
    texts: list[list[str]]                               # token text per row and position
    inputs: list[dict[str, InputStats]]                  # per layer: group source linear -> stats
    levels: list[dict[str, torch.Tensor]]                # per layer: name -> sum_t |x_ti| / max_j |x_tj|, [in]
    hidden_inputs: list[dict[str, torch.Tensor]]         # per layer: norm-fed linear -> [tokens, hidden]
    residual: list[torch.Tensor]                         # per layer: output [N, L, hidden]
    embedded: torch.Tensor                               # the first layer's input [N, L, hidden]
    down: list[DownStats] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.rows.numel())


def _down_in(x: torch.Tensor):
    x = x.reshape(-1, x.shape[-1])
    arg = x.abs().argmax(-1)
    return x.gather(1, arg[:, None])[:, 0].clone(), arg


def _per_token_share(x: torch.Tensor) -> torch.Tensor:
    a = x.reshape(-1, x.shape[-1]).abs().double()
    return (a / a.amax(-1, keepdim=True).clamp_min(1e-30)).sum(0)


def _names(spec: ArchSpec):
    sources = [g.linears[0] for g in spec.groups]
    hidden = [g.linears[0] for g in spec.groups if g.source_kind == "norm"]
    full = lambda i, n: f"{spec.layers}.{i}.{n}"
    return sources, hidden, full


@torch.no_grad()
def collect_down(model, spec: ArchSpec, rows: torch.Tensor, progress: bool = True,
                 desc: str = "down_proj") -> tuple[list[DownStats], list[torch.Tensor], torch.Tensor]:
    """Only the down projection's per-token input spikes and outputs, the residual stream and its start."""
    n_layers = len(model.get_submodule(spec.layers))
    names = [f"{spec.layers}.{i}.{spec.down}" for i in range(n_layers)]
    layer_paths = [f"{spec.layers}.{i}" for i in range(n_layers)]
    with capture_token_inputs(model, names, _down_in) as ins, \
         capture_outputs(model, names, lambda y: y.reshape(-1, y.shape[-1]).clone()) as outs, \
         capture_outputs(model, layer_paths, lambda h: h[0].clone()) as res, \
         capture_token_inputs(model, layer_paths[:1], lambda h: h[0].clone()) as emb:
        for row in tqdm(rows, desc=desc, unit="seq", disable=not progress, leave=False):
            model(input_ids=row[None], use_cache=False, logits_to_keep=1)
    down = [DownStats(torch.cat([v for v, _ in ins[n]]), torch.cat([a for _, a in ins[n]]), torch.cat(outs[n]))
            for n in names]
    return down, [torch.stack(res[p]) for p in layer_paths], torch.stack(emb[layer_paths[0]])


def estimate_bytes(model, spec: ArchSpec, rows: torch.Tensor) -> int:
    cfg = model.config
    n_layers = len(model.get_submodule(spec.layers))
    n_hidden = sum(g.source_kind == "norm" for g in spec.groups)
    per_token = (n_layers * (cfg.hidden_size * (n_hidden + 2) + 2) + cfg.hidden_size) * 4
    return int(rows.numel() * per_token)


@torch.no_grad()
def collect(model, spec: ArchSpec, tokenizer, rows: torch.Tensor, progress: bool = True) -> Collected:
    """Run every row once (BOS first) and keep what the detectors need."""
    need = estimate_bytes(model, spec, rows)
    logger.info("analysis: %d x %d tokens; per-token activations kept: %.0f MiB", *rows.shape, need / 2**20)
    if need > MEMORY_LIMIT:
        raise LowbitError(f"--samples {rows.shape[0]} x --seq-len {rows.shape[1]} would keep {need / 2**30:.1f} GiB "
                          f"of activations (limit {MEMORY_LIMIT / 2**30:.0f} GiB): use fewer or shorter sequences")
    n_layers = len(model.get_submodule(spec.layers))
    sources, hidden, full = _names(spec)
    src = [full(i, n) for i in range(n_layers) for n in sources]
    hid = [full(i, n) for i in range(n_layers) for n in hidden]
    downs = [full(i, spec.down) for i in range(n_layers)]
    layer_paths = [f"{spec.layers}.{i}" for i in range(n_layers)]
    with capture_inputs(model, src, {"absmax", "mean_abs", "moments", "rows"}) as stats, \
         capture_token_inputs(model, src, _per_token_share) as shares, \
         capture_token_inputs(model, hid, lambda x: x.reshape(-1, x.shape[-1]).clone()) as hid_x, \
         capture_outputs(model, layer_paths, lambda h: h[0].clone()) as res, \
         capture_token_inputs(model, layer_paths[:1], lambda h: h[0].clone()) as emb, \
         capture_token_inputs(model, downs, _down_in) as d_in, \
         capture_outputs(model, downs, lambda y: y.reshape(-1, y.shape[-1]).clone()) as d_out:
        for row in tqdm(rows, desc="activations", unit="seq", disable=not progress):
            try:
                model(input_ids=row[None], use_cache=False, logits_to_keep=1)
            except FloatingPointError as e:
                raise LowbitError(f"the float model: {e}") from None
    return Collected(
        rows=rows, texts=token_texts(tokenizer, rows),
        inputs=[{n: stats[full(i, n)] for n in sources} for i in range(n_layers)],
        levels=[{n: sum(shares[full(i, n)]).float() for n in sources} for i in range(n_layers)],
        hidden_inputs=[{n: torch.cat(hid_x[full(i, n)]) for n in hidden} for i in range(n_layers)],
        residual=[torch.stack(res[p]) for p in layer_paths], embedded=torch.stack(emb[layer_paths[0]]),
        down=[DownStats(torch.cat([v for v, _ in d_in[p]]), torch.cat([a for _, a in d_in[p]]), torch.cat(d_out[p]))
              for p in downs],
    )
