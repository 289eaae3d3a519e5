"""`lowbit compare`'s default grid, timed (issue 27: "finishes in about 30 minutes for SmolLM2 on this
machine"): the acceptance command in its own process on a fresh --out, its wall time and peak RSS, and
each cell's seconds, bits and KLD from the results.json it writes.

    python bench/compare_grid.py --model smollm2-135m [--work DIR] [-- extra lowbit compare flags]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from common import CALIB_TEXT, EVAL_TEXT, REPO, machine, run_measured, table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", default=str(Path.home() / ".cache/lowbit/bench/compare"))
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more `lowbit compare` flags (after --); none: the default grid")
    a = p.parse_args()
    out = Path(a.work) / Path(a.model).name
    if (out / "compare.json").exists():
        shutil.rmtree(out)                        # a fresh compare: cached cells would not be timed
    argv = [sys.executable, "-m", "lowbit", "-q", "compare", a.model, "--calib", str(CALIB_TEXT), "--text",
            str(EVAL_TEXT), "--out", str(out), *a.extra]
    wall, rss, _ = run_measured(argv)
    load = os.getloadavg()[0]
    results = json.loads((out / "results.json").read_text())
    cells = [{k: c.get(k) for k in ("label", "method", "bits_per_weight", "ppl", "kld", "seconds", "quantize_seconds")}
             for c in results["cells"]]
    path = Path(a.json or REPO / "bench" / "results" / f"compare_{Path(a.model).name}.json")
    write_json(path, {"bench": "compare", "model": a.model, "machine": machine(),
                      "command": "lowbit compare " + " ".join([a.model, "--calib", "../shared/data/wikitext-2/valid.txt",
                                                               "--text", "../shared/data/wikitext-2-raw/test.txt",
                                                               "--out", "DIR", *a.extra]),
                      "settings": {k: results[k] for k in ("samples", "seq_len", "windows", "ctx")},
                      "wall_seconds": wall, "peak_rss_mib": rss, "load_average_after": load,
                      "float_ppl": results["float_ppl"], "cells": cells})
    print(table(["cell", "bits/weight", "KLD", "seconds"],
                [[c["label"], f"{c['bits_per_weight']:.3f}", f"{c['kld']:.4g}", f"{c['seconds']:.0f}"] for c in cells]))
    print(f"{len(cells)} cells in {wall / 60:.1f} min, peak RSS {rss} MiB; wrote {path}")


if __name__ == "__main__":
    main()
