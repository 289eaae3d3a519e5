"""`lowbit demo`: short demonstrations on real numbers. `lowbit demo range`: range versus resolution."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LowbitError
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="short demonstrations on a real model (demo range)",
                       description="Short terminal demonstrations on real numbers of a real model.")
    demos = p.add_subparsers(dest="demo", required=True, metavar="DEMO")
    r = demos.add_parser("range", help="range versus resolution: absmax int8/int4 with and without the outlier",
                         description="Takes one real weight row (the down-projection row most dominated by one "
                                     "weight) and one real activation vector (the attention or MLP input most "
                                     "dominated by one value) and quantizes each with absmax int8 and int4 grids, "
                                     "once with the outlier inside the range and once with it set aside in float "
                                     "(LLM.int8()'s split): how far apart the levels are, how many the other "
                                     "values use, and their error.")
    r.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    r.add_argument("--text", default=None, help="text for the activation (default: the built-in sample text)")
    r.add_argument("--tokens", type=int, default=64, help="tokens run for the activation, BOS first (default: 64)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, as lowbit analyze)")
    r.add_argument("--plot", default=None, type=Path, metavar="FILE", help="also draw the int4 grids to a PNG file")
    r.set_defaults(run=run_range)


def _describe(v, k: int) -> str:
    rest = v.abs().clone()
    rest[k] = 0
    return f"{v.numel()} values; the outlier {float(v[k]):.4g} at index {k}, the others within ±{float(rest.max()):.3g}"


def run_range(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.default_text import default_text
    from ..data.text import read_text

    if args.plot is not None and (args.plot.is_dir() or args.plot.suffix.lower() != ".png"):
        raise LowbitError(f"--plot {args.plot} must be a .png file path")
    if args.tokens < 2:
        raise LowbitError(f"--tokens {args.tokens} must be at least 2")
    if args.threads < 1:
        raise LowbitError(f"--threads {args.threads} must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _range(args, read_text(args.text) if args.text else default_text())
    finally:
        torch.set_num_threads(threads)


def _range(args: argparse.Namespace, text) -> int:
    import torch

    from ..analysis.range_demo import grid_rows, pick_activation, pick_weight_row, plot
    from ..models.load import load

    loaded = load(args.model)
    model, spec, tok = loaded.model, loaded.spec, loaded.tokenizer
    ids = torch.as_tensor(tok(text.text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = getattr(tok, "bos_token_id", None)
    ids = torch.cat([torch.tensor([bos]), ids]) if bos is not None else ids
    if ids.numel() < args.tokens:
        raise LowbitError(f"text {text.origin} has {ids.numel()} tokens, fewer than --tokens {args.tokens}")
    ids = ids[: args.tokens]
    layer, row, w = pick_weight_row(model, spec)
    a_layer, a_name, pos, x = pick_activation(model, spec, ids)
    vectors = [(f"weight row {row} of layer {layer} {spec.down}", w),
               (f"input of layer {a_layer} {a_name} at position {pos} ({tok.decode([int(ids[pos])])!r})", x)]
    print(f"Range versus resolution on {loaded.source.name}: an absmax grid spends its few levels on the largest "
          "value; everything else shares what is left.\n")
    for title, v in vectors:
        k, rows = grid_rows(v)
        print(f"{title}: {_describe(v.double(), k)}")
        print(table(["grid", "outlier", "level step", "levels the others use", "others rounded to 0",
                     "error of the others"],
                    [[f"int{r.bits} absmax", r.outlier, r.step, f"{r.levels_used} of {r.levels}",
                      f"{r.zero_share:.0%}", f"{r.rel_error:.1%}"] for r in rows]))
        r4_in, r4_out = (r for r in rows if r.bits == min(x.bits for x in rows))
        print(f"-> at int{r4_in.bits}, setting the one outlier aside shrinks the step {r4_in.step / r4_out.step:.0f}x "
              f"and the others' error from {r4_in.rel_error:.0%} to {r4_out.rel_error:.0%}.\n")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(vectors, 4, args.plot)
        print(f"wrote {args.plot}")
    return 0
