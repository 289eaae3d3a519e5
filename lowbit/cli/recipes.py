"""`lowbit recipes`: the built-in recipes, one line each (`--show NAME` prints one in full)."""
from __future__ import annotations

import argparse

from ..errors import LowbitError
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list the built-in quantization recipes",
                       description="List the recipes `lowbit quantize --recipe NAME` accepts; a recipe is a YAML "
                                   "file of steps, weight formats and activation formats (pass your own as "
                                   "--recipe FILE.yaml).")
    p.add_argument("--show", default=None, metavar="NAME", help="print one recipe's YAML")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..recipes import HERE, builtin_names, load_recipe

    if args.show:
        try:
            load_recipe(args.show)
        except ValueError as e:
            raise LowbitError(str(e)) from None
        print((HERE / f"{args.show}.yaml").read_text() if args.show in builtin_names() else open(args.show).read())
        return 0
    rows = []
    for name in builtin_names():
        r = load_recipe(name)
        acts = "-" if r.activations is None else r.activations.default.name
        method = "+".join((["spinquant" if r.rotation.spin_steps else "rotate"] if r.rotation else []) +
                          (["incoherence"] if r.incoherence else []) + [r.method])
        kv = "-" if r.kv is None else "/".join("float" if f is None else f.name for f in (r.kv.k, r.kv.v))
        rows.append([name, method, r.weights.default.name, acts, kv, r.description])
    print(table(["recipe", "steps", "weights", "activations", "KV cache", "description"], rows))
    return 0
