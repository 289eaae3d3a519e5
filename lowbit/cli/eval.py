"""`lowbit eval`: perplexity and KL divergence on a text, by one stated convention."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import LowbitError
from ..log import logger
from .kv_args import add_kv_args, install, key_scales, kv_config
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and KL divergence of a model on a text",
                       description="Perplexity in the GPTQ convention (printed with the result) and, against a "
                                   "reference model, the KL divergence of the next-token distributions.")
    p.add_argument("model", help="a lowbit directory, a model name, a .gguf file or an HF directory")
    p.add_argument("--text", required=True,
                   help="evaluation text: a UTF-8 file, or a Hugging Face dataset 'name/config:split' when online")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--windows", type=int, default=None, help="evaluate the first N windows (default: all)")
    p.add_argument("--kld-ref", default=None, metavar="MODEL",
                   help="reference model for KL divergence (default: the source recorded in a lowbit "
                        "directory; none for a float model); 'none' turns KLD off")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    add_kv_args(p)
    p.set_defaults(run=run)


def _reference(args, loaded):
    """The reference model argument, or None when KLD is off."""
    if args.kld_ref is not None:
        return None if args.kld_ref.lower() == "none" else args.kld_ref
    if loaded.source.kind == "lowbit":
        from ..export.lowbit_dir import read_manifest
        from ..log import logger

        manifest = read_manifest(loaded.source.path)
        if manifest["method"].get("method") == "import":  # its source is the quantized checkpoint itself
            logger.warning("no float reference is recorded for an imported checkpoint: KLD is off "
                           "(pass --kld-ref MODEL to compare against the float model)")
            return None
        return manifest["source"]["arg"]
    return None


def activation_summary(model) -> str:
    """How the model's quantized linears treat their inputs, as one line ("" when weight-only)."""
    from ..nn.qlinear import QuantLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.act is not None:
            path = "int8 kernel" if m.kernel == "auto" and "W_c" in m._buffers else "simulated"
            key = f"{m.act.name} ({path})"
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return ""
    return ", ".join(f"{k} on {v} linears" for k, v in counts.items()) + \
        "; each input is quantized as the linear reads it (dynamic scales per forward, static ones from calibration)"


def rotation_kv_summary(model) -> str:
    """Online rotations and the simulated KV quantizer the model runs, as one line ("" when none)."""
    from ..nn.qlinear import QuantLinear

    parts = []
    online = sum(1 for m in model.modules() if isinstance(m, QuantLinear) and m.input_transform is not None)
    if online:
        parts.append(f"online Hadamard on the input of {online} linears")
    kv = next((m.lowbit_kv for m in model.modules() if getattr(m, "lowbit_kv", None) is not None), None)
    if kv is not None:
        parts.append(f"KV cache {kv.name}: K (after RoPE) and V quantized as they enter attention, every query "
                     "reads the de-quantized values of every earlier token of its window and its own")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..data.text import read_text
    from ..eval.perplexity import check_ctx, evaluate, tokenize
    from ..eval.size import size_report
    from ..models.load import load

    text = read_text(args.text)                 # cheap checks before the slow load
    if args.windows is not None and args.windows < 1:
        raise LowbitError(f"--windows {args.windows} must be at least 1")
    kv = kv_config(args, args.ctx)
    start = time.perf_counter()
    loaded = load(args.model)
    check_ctx(loaded.model, args.ctx)
    kv_line = install(loaded, kv, key_scales(args, loaded, kv)) if kv is not None else ""
    ref_arg = _reference(args, loaded)
    reference = load(ref_arg).model if ref_arg else None
    if reference is not None and reference.config.vocab_size != loaded.model.config.vocab_size:
        raise LowbitError(f"--kld-ref {ref_arg} has a different vocabulary than {args.model}")
    ids = tokenize(loaded.tokenizer, text.text)
    logger.info("%s: %d tokens; evaluating", text.origin, ids.numel())
    result = evaluate(loaded.model, ids, args.ctx, args.windows, reference=reference,
                      reference_name=ref_arg or "")
    size = size_report(loaded.model)
    record = {
        "model": args.model, "source": loaded.source.name, "ppl": result.ppl, "nll": result.nll,
        "tokens": result.tokens, "ctx": result.ctx, "windows": result.windows,
        "predictions": result.windows * (result.ctx - 1),
        "kld": None if result.kld is None else vars(result.kld),
        "bits_per_weight": size.bits_per_weight if size.quantized_params else None,
        "model_bits_per_weight": size.model_bits_per_weight,
        "text": {"path": text.origin, "sha256": text.sha256},
        "convention": result.convention, "seconds": time.perf_counter() - start,
        "eval_seconds": result.seconds,
    }
    kld = result.kld
    print(table(["model", "ppl", "KLD", "KLD p99", "top-1 changed", "bits/weight", "tokens", "windows", "seconds"],
                [[loaded.source.name, result.ppl, kld and kld.mean, kld and kld.p99, kld and kld.top1_changed,
                  record["bits_per_weight"], result.tokens, f"{result.windows} x {result.ctx}",
                  record["seconds"]]]))
    print(f"convention: {result.convention}")
    acts = activation_summary(loaded.model)
    if acts:
        record["activations"] = acts
        print(f"activations: {acts}")
    if kv_line:
        record["kv_cache"] = {**kv.to_dict(), "convention": kv_line}
        print(f"kv cache: {kv_line}")
    rot = rotation_kv_summary(loaded.model)
    if rot:
        record["rotations_kv"] = rot
        print(f"rotations/KV: {rot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0
