"""Per-tensor losses for `lowbit plan` (plans.planner): what rounding one decoder linear costs, for
every candidate option (a format, or a format with a share of outliers kept in float16).

  measured_losses  the KL divergence against the float model on probe rows when that tensor alone is
                   round-to-nearest quantized (what `lowbit analyze`'s sensitivity measures), or
                   rounded by GPTQ on its input Hessian from other rows (rounding="gptq": the loss of
                   the tensor as `lowbit quantize --plan … --method gptq` will store it);
  proxy_losses     the Hessian-weighted error tr(E H Eᵀ) / n of the same rounding on the same rows
                   (one pass, no re-evaluation).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..formats import Format
from ..methods.outliers import kept_rtn
from ..plans.planner import option_name, tensor_options
from ..quantize_config import SINK_WEIGHT


ROUNDINGS = ("rtn", "gptq")


class _AllSeen(Exception):
    """Raised once every named linear has seen its input: the rest of the forward is not needed."""


@torch.no_grad()
def input_hessians(model, rows: torch.Tensor, names: list[str], batch: int = 4,
                   sink_weight: float = 1.0) -> tuple[dict, dict]:
    """({name: H = Σ x xᵀ float64 [in, in]}, {name: rows counted}) of each named linear's inputs on
    `rows` [N, L] (a forward of `batch` rows at a time). Each forward stops once every named linear has
    been called: one layer's Hessians then cost the layers up to it, not the whole model and its
    vocabulary-sized head. sink_weight: each row's first token counted that many times in H (as
    `lowbit quantize --sink-weight` counts it; the count of rows is unchanged)."""
    H, count, hooks = {}, {}, []
    seen: set[str] = set()
    wanted = len(set(names))

    def hook(name):
        def fn(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()          # [B, T, d_in] -> [B·T, d_in]
            H[name] = H.get(name, 0) + x.T @ x
            if sink_weight != 1.0:
                x0 = args[0][:, 0].double()                                  # [B, T, d_in] -> [B, d_in]: the sinks
                H[name] = H[name] + (sink_weight - 1.0) * (x0.T @ x0)
            count[name] = count.get(name, 0) + x.shape[0]
            seen.add(name)
            if len(seen) == wanted:
                raise _AllSeen
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        for i in range(0, rows.shape[0], batch):
            seen.clear()
            try:
                model(input_ids=rows[i:i + batch], use_cache=False)
            except _AllSeen:
                pass
    finally:
        for h in hooks:
            h.remove()
    return H, count


@torch.no_grad()
def rounded(W: torch.Tensor, fmt: Format, share: float = 0.0, H: torch.Tensor | None = None,
            rounding: str = "rtn", gptq_config=None) -> torch.Tensor:
    """W_dq [out, in] of one option: W [out, in] rounded to nearest ("rtn") or by GPTQ on H [in, in]
    ("gptq": with gptq_config, default `lowbit quantize`'s own options, QUANTIZE_GPTQ — the loss of another
    rounding than the one stored misleads the plan, and act order changes most what the coarse formats
    lose); with `share` > 0 that share is kept in float16 (chosen on H)."""
    from ..formats import GGUFFormat
    from ..formats.gguf import gguf_type
    from ..methods.gptq import gptq, gptq_outliers
    from ..methods.gptq_gguf import gptq_gguf
    from ..quantize_config import QUANTIZE_GPTQ

    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r} (known: {', '.join(ROUNDINGS)})")
    if (share or rounding == "gptq") and H is None:
        raise ValueError("outliers and GPTQ need the tensor's input Hessian H")
    if rounding == "rtn":
        return kept_rtn(W, fmt, H, share) if share else fmt.fake_quantize(W.float())
    g = gptq_config or QUANTIZE_GPTQ
    if isinstance(fmt, GGUFFormat):
        if gguf_type(fmt.type_name).set_codes is None:       # a lookup-table type: no grid to round on
            return fmt.dequantize(fmt.quantize(W.float(), importance=H.diagonal().float()))
        data, _ = gptq_gguf(W, H, fmt.type_name, damp=g.damp)
        return fmt.dequantize(fmt.from_bytes(data, tuple(W.shape)))
    options = g.options()
    if share:
        q, _, sparse = gptq_outliers([W], H, fmt, share, **options)[0]
        return sparse.apply(fmt.dequantize(q))
    return fmt.dequantize(gptq(W, H, fmt, **options)[0])


@torch.no_grad()
def measured_losses(model, spec, probe, names: list[str], fmts: list[Format], shares: tuple[float, ...] = (),
                    progress: bool = True, known: dict | None = None, beside: tuple[str, ...] | None = None,
                    rounding: str = "rtn", hessian_rows: torch.Tensor | None = None) -> dict:
    """{tensor: {option: KLD}} with that tensor alone fake-quantized (`rounded`: RTN or GPTQ; an outlier
    option keeps its share in float16), replayed from its layer. Options: each stored format, and each
    non-GGUF one with each of `shares` (named by option_name; only beside the formats named in `beside`,
    None: all). known: losses measured before on the same probe, reused. hessian_rows [N, L]: the rows
    whose inputs give GPTQ's and the outliers' H (default: the probe's own; GPTQ fitted on the rows it is
    judged on would look better than it is, so give others)."""
    known = known or {}
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r} (known: {', '.join(ROUNDINGS)})")
    need_h = bool(shares) or rounding == "gptq"
    h_rows = probe.rows if hessian_rows is None else hessian_rows
    layer_of = {n: int(n.removeprefix(spec.layers + ".").split(".")[0]) for n in names}
    H, H_layer = {}, None
    out = {}
    shape = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    total = sum(option_name(f.name, sh) not in known.get(n, {})
                for n in names for f, sh in tensor_options(fmts, shares, shape[n], beside))
    bar = tqdm(total=total, desc="plan: per-tensor KLD", unit="eval", disable=not progress)
    for name in names:
        layer = layer_of[name]
        if need_h and layer != H_layer:
            # one layer's Hessians at a time: all of a large model's at once would not fit in memory
            # counting the sinks as `lowbit quantize` does: GPTQ and the outliers fitted as they will be stored
            H, H_layer = input_hessians(model, h_rows, [n for n in names if layer_of[n] == layer],
                                        sink_weight=SINK_WEIGHT)[0], layer
        module = model.get_submodule(name)
        W = module.weight.data
        out[name] = {}
        for f, share in tensor_options(fmts, shares, tuple(W.shape), beside):
            if (label := option_name(f.name, share)) in known.get(name, {}):
                out[name][label] = known[name][label]
                continue
            W_dq = rounded(W, f, share, H.get(name), rounding)
            try:
                module.weight.data = W_dq.to(W.dtype)
                out[name][label] = probe.score(layer)["kld"]
            finally:
                module.weight.data = W
            bar.update()
        H.pop(name, None)                                                   # done with it: free its memory
    bar.close()
    return out


@torch.no_grad()
def proxy_losses(model, rows: torch.Tensor, names: list[str], fmts: list[Format],
                 shares: tuple[float, ...] = (), beside: tuple[str, ...] | None = None) -> dict:
    """{tensor: {option: tr(E H Eᵀ) / n}}: H = Σ x xᵀ of the tensor's inputs on `rows`, n their count,
    E = W − W_dq of the option's rounding — the mean squared error it adds to the tensor's outputs."""
    H, count = input_hessians(model, rows, names)
    out = {}
    for name in names:
        W = model.get_submodule(name).weight.float()
        out[name] = {}
        for f, share in tensor_options(fmts, shares, tuple(W.shape), beside):
            W_dq = kept_rtn(W, f, H[name], share) if share else f.fake_quantize(W)
            E = (W - W_dq).double()                                        # [d_out, d_in]
            out[name][option_name(f.name, share)] = float(((E @ H[name]) * E).sum() / count[name])  # tr(E H Eᵀ) / n
        del H[name]
    return out
