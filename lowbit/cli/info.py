"""`lowbit info`: what a model file or directory holds, without loading it into a model."""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from ..errors import LowbitError
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, formats, bits per weight, size on disk")
    p.add_argument("path", help="a lowbit directory, a .gguf file, an HF directory or a model name")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(run=run)


def _disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _safetensors_params(path: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    shapes[key] = (sl.get_shape(), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"cannot read {file}: {e}") from None
    return shapes


def _lowbit_info(path: Path) -> dict:
    from ..export.lowbit_dir import read_manifest

    manifest = read_manifest(path)
    config = json.loads((path / "config.json").read_text())
    stored = _safetensors_params(path)
    q_params = sum(e["shape"][0] * e["shape"][1] for e in manifest["tensors"].values())
    q_bits = sum(e["bits"] for e in manifest["tensors"].values())
    float_keys = [k for k in stored if not any(k.startswith(n + ".") for n in manifest["tensors"])]
    f_params = sum(_numel(stored[k][0]) for k in float_keys)
    layers = defaultdict(set)
    for name, entry in manifest["tensors"].items():
        m = re.search(r"\.(\d+)\.", name)
        layers[int(m.group(1)) if m else name].add(_fmt_name(entry["format"]))
    return {"kind": "lowbit", "architecture": config.get("model_type"), "method": manifest["method"]["method"],
            "source": manifest["source"], "quantized_params": q_params, "float_params": f_params,
            "bits_per_weight": q_bits / q_params if q_params else None,
            "float_tensors": [k for k in float_keys if len(stored[k][0]) == 2],
            "layers": {str(k): sorted(v) for k, v in layers.items()}}


def _fmt_name(d: dict) -> str:
    from ..formats import format_from_dict

    return format_from_dict(d).name


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _gguf_info(path: Path) -> dict:
    from ..models.gguf_check import open_gguf

    reader = open_gguf(path)  # checked first: a corrupted or truncated file is one LowbitError line
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "?"
    by_type = defaultdict(lambda: [0, 0, 0])
    for t in reader.tensors:
        row = by_type[t.tensor_type.name]
        row[0] += 1
        row[1] += int(t.n_elements)
        row[2] += int(t.n_bytes)
    params = sum(r[1] for r in by_type.values())
    return {"kind": "gguf", "architecture": arch, "params": params,
            "bits_per_weight": 8 * sum(r[2] for r in by_type.values()) / params,
            "tensor_types": {k: {"tensors": v[0], "params": v[1], "bits_per_weight": 8 * v[2] / v[1]}
                             for k, v in by_type.items()},
            # shape in PyTorch order [rows, row_length] (GGUF stores ggml's ne, row length first)
            "tensors": [{"name": t.name, "type": t.tensor_type.name, "shape": [int(s) for s in reversed(list(t.shape))],
                         "bits_per_weight": 8 * int(t.n_bytes) / int(t.n_elements)} for t in reader.tensors]}


def _hf_info(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    stored = _safetensors_params(path)
    return {"kind": "hf", "architecture": config.get("model_type"),
            "params": sum(_numel(s) for s, _ in stored.values()),
            "dtypes": sorted({d for _, d in stored.values()})}


def run(args: argparse.Namespace) -> int:
    from ..models.registry import resolve

    source = resolve(args.path)
    info = {"lowbit": _lowbit_info, "gguf": _gguf_info, "hf": _hf_info}[source.kind](source.path)
    info["path"] = str(source.path)
    info["disk_bytes"] = _disk_bytes(source.path)
    rows = [[k, v] for k, v in info.items() if not isinstance(v, (dict, list))]
    print(table(["field", "value"], rows))
    if "layers" in info:
        print()
        print(table(["layer", "formats"], [[k, ", ".join(v)] for k, v in info["layers"].items()]))
        print(f"kept in float: {', '.join(info['float_tensors']) or '-'} (and all norms and biases)")
    if "tensor_types" in info:
        print()
        print(table(["type", "tensors", "params", "bits/weight"],
                    [[k, v["tensors"], v["params"], v["bits_per_weight"]] for k, v in info["tensor_types"].items()]))
    if info.get("kind") == "gguf":
        print()
        print(table(["tensor", "type", "shape", "bits/weight"],
                    [[t["name"], t["type"], "x".join(map(str, t["shape"])), t["bits_per_weight"]]
                     for t in info["tensors"]]))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0
