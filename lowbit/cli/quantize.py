"""`lowbit quantize`: load a model, quantize its linears, save a lowbit directory."""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from ..errors import LowbitError
from ..methods.awq import AwqConfig
from ..methods.gptq import GptqConfig
from ..methods.rtn import RtnConfig
from ..quantize import CALIBRATED, INPUTS, METHODS, SINK_WEIGHT, WALKS, QuantizeConfig, quantize
from ..plans.planner import option_name
from ..quantize_config import QUANTIZE_GPTQ
from .common import add_format_args, format_from_args, parse_share, plan_from_args, recorded_command
from .quantize_control import check_memory, launch, resume_dir
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize the linears inside the decoder layers (embeddings and LM head stay "
                                   "float unless --quantize-head, a --plan or a GGUF mix names them) in the formats "
                                   "the flags, --plan FILE or --format gguf --type MIX choose per tensor, and save "
                                   "packed weights to --out. Calibrated "
                                   f"methods ({', '.join(CALIBRATED)}) run the --calib samples through the model "
                                   "one decoder layer at a time; each layer sees the outputs of the already "
                                   "quantized layers before it.")
    p.add_argument("model", help="smollm2-135m, gemma3-270m, a .gguf file, an HF directory")
    p.add_argument("--method", default=None,
                   help=f"quantization method (default: rtn; known: {', '.join(METHODS)}); awq+gptq = AWQ "
                        "scales folded in, then GPTQ; smooth = SmoothQuant's scales folded in (with --act)")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help="a whole recipe: steps, weight and activation formats (`lowbit recipes` lists the "
                        "built-ins: w8a8-smoothquant, llm-int8, ...; or a .yaml file); replaces --method and "
                        "the format flags")
    add_format_args(p)
    x = p.add_argument_group("activations")
    x.add_argument("--act", default=None, metavar="FORMAT",
                   help="also quantize every quantized linear's input: a8-token-sym (per-token dynamic), "
                        "a8-tensor-sym, a8-static-sym (calibrated; needs --calib), a4-g128-asym, "
                        "...-clip0.9, ...-split6 (LLM.int8()'s float columns); default: weights only")
    x.add_argument("--alpha", default=None, metavar="A|search",
                   help="SmoothQuant's migration strength in [0, 1] (the paper: 0.5), or 'search' per layer on the "
                        "quantized output error (default: the recipe's — w8a8-smoothquant searches — else 0.5)")
    x.add_argument("--outlier-threshold", type=float, default=None, metavar="T",
                   help="LLM.int8(): input columns with any |x| >= T go through the float path (recipe "
                        "llm-int8's default: 6)")
    r = p.add_argument_group("rotations")
    r.add_argument("--rotate", default=None, metavar="KIND",
                   help="fuse QuaRot's rotations first: hadamard (randomized Hadamard; random orthogonal with a "
                        "warning where no construction exists) or random (Haar orthogonal); a rotating recipe's "
                        "default: its own")
    r.add_argument("--rotate-seed", default=None, metavar="N",
                   help="seed of the rotations' random signs / Gaussian (default 0, or the recipe's)")
    r.add_argument("--save-rotation", default=None, metavar="FILE",
                   help="also write the rotation matrices fused in (R1, R2; SpinQuant's learned ones) as safetensors: "
                        "a recipe's `rotate: {learned: FILE}` applies them again")
    p.add_argument("--clip", default=None, choices=("none", "mse"),
                   help="clip search (default: mse for awq, as AutoAWQ; none for the others). mse: rtn and "
                        "gptq pick each group's shrink factor minimising the weight error; awq picks clip "
                        "factors minimising the output error on the calibration inputs")
    c = p.add_argument_group("calibration (imatrix, gptq, awq, awq+gptq)")
    c.add_argument("--calib", default=None, metavar="PATH",
                   help="calibration text file (required for calibrated methods; the evaluation text is refused)")
    c.add_argument("--samples", type=int, default=128, help="calibration windows (default: 128)")
    c.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window (default: 2048)")
    c.add_argument("--seed", type=int, default=0, help="seed of the window positions (default: 0)")
    c.add_argument("--offload", default=None, metavar="DIR",
                   help="keep the calibration activations in files under DIR instead of memory (default: memory)")
    c.add_argument("--walk", default="auto", choices=WALKS,
                   help="sequential: one forward per layer, each group solved when every sample reaches it "
                        "(keeps all samples' intermediates in memory); two-pass: capture, solve all, re-run "
                        "(AWQ needs it). Default auto: sequential unless AWQ, --offload, or the samples' activations "
                        "would take over a quarter of the available memory")
    c.add_argument("--inputs", default="quantized", choices=INPUTS,
                   help="calibration inputs of each layer: from the already-quantized layers before it (default) "
                        "or from the float model (two-pass walk, write-back at the end)")
    c.add_argument("--allow-eval-text", action="store_true", help="allow calibrating on the evaluation text")
    c.add_argument("--sink-weight", type=float, default=SINK_WEIGHT,
                   help="count each sample's first token (the attention sink) this many times in the Hessians "
                        f"(default: {SINK_WEIGHT:g}; 1 = plain sum of xᵀx)")
    g = p.add_argument_group("gptq")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=QUANTIZE_GPTQ.act_order,
                   help="quantize columns by descending Hessian diagonal (groups stay static, so every export "
                        "layout holds the result; default: on). With the signed scale rule it gives the best "
                        "benchmarked rows on both models at every setting (docs/results/calibrated.md)")
    g.add_argument("--damp", type=float, default=QUANTIZE_GPTQ.damp, help="damping, a fraction of mean(diag H) (default: 0.01)")
    g.add_argument("--block-size", type=int, default=QUANTIZE_GPTQ.block_size, help="GPTQ lazy-update block (default: 128)")
    g.add_argument("--outliers", default=None, metavar="SHARE",
                   help="dense-and-sparse: keep this share of each weight (e.g. 0.5%% or 0.005) in float16 beside "
                        "the low-bit part, the weights of largest OBS saliency, chosen before GPTQ so it "
                        "compensates around them; counted in bits per weight (48 bits each)")
    g.add_argument("--outlier-layout", choices=("entries", "columns"), default="entries",
                   help="--outliers as single weights (default) or as whole input columns of largest summed "
                        "saliency (OWQ; the share counts columns; 32 bits per column + 16 per weight)")
    a = p.add_argument_group("awq")
    a.add_argument("--duo", action=argparse.BooleanOptionalAction, default=True,
                   help="also try AutoAWQ's weight-aware scales mean|x|^a / mean(|W|/absmax)^(1-a) besides "
                        "mean|x|^a (default: on; --no-duo halves the search)")
    a.add_argument("--clip-sweeps", type=int, default=1,
                   help="passes of AWQ's clip search over the groups on the whole output error; 0 judges "
                        "each group alone (default: 1)")
    p.add_argument("--save-plan", default=None, metavar="DIR",
                   help="awq: also write the AWQ plan (plan.json + plan.safetensors) to DIR")
    p.add_argument("--write-plan", default=None, metavar="FILE",
                   help="also write the per-tensor format plan used (JSON, or YAML for .yaml/.yml) to FILE: a "
                        "llama.cpp mix or uniform flags as a file to edit and pass back with --plan")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head (untied from the embedding)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="keep linears matching this glob in float (e.g. 'model.layers.0.*'); repeatable")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--lazy", action="store_true",
                   help="for models larger than memory: read each decoder layer from the safetensors files (or the "
                        "GGUF, de-quantized tensor by tensor) when the walk reaches it and write it to --out as soon "
                        "as it is quantized (one layer's weights in memory, the output a shard per layer)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="calibrate in N processes (torch.distributed, gloo): each walks its share of the samples, "
                        "the statistics are summed before every solve; launches torchrun on this machine "
                        "(across machines run torchrun yourself: lowbit/calibration/distributed.py)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibrated run from its last finished layer (the checkpoint "
                        "beside --out, .OUT.resume/); the result is byte-identical to an uninterrupted run's. "
                        "Refused when the checkpoint was made by another command or model")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(run=run)


def _method(args: argparse.Namespace) -> str:
    return args.method or "rtn"


def _clip(args: argparse.Namespace) -> str:
    """--clip, or its per-method default: AWQ's own clip search for awq (AutoAWQ applies it)."""
    return args.clip or ("mse" if _method(args) == "awq" else "none")


def _recipe(args: argparse.Namespace):
    """The --recipe, with --alpha / --outlier-threshold applied; conflicting flags are one line."""
    from ..recipes import load_recipe

    if args.recipe is None:
        return None
    given = [f for f, v in (("--method", args.method), ("--plan", args.plan), ("--act", args.act),
                            ("--type", args.type)) if v] + (["--format"] if args.format != "int" else [])
    if given:
        raise LowbitError(f"--recipe sets the steps and formats: drop {', '.join(given)}")
    try:
        return load_recipe(args.recipe)
    except ValueError as e:
        raise LowbitError(str(e)) from None


def _act_plan(args: argparse.Namespace, recipe):
    """The activation plan: the recipe's, or --act for every linear; --outlier-threshold applied."""
    from ..formats.activation import act_format_from_name
    from ..plans import FormatPlan

    if args.outlier_threshold is not None and not 0 < args.outlier_threshold < float("inf"):
        raise LowbitError(f"--outlier-threshold must be a number > 0, got {args.outlier_threshold:g}")
    plan = recipe.activations if recipe is not None else None
    if args.act:
        try:
            plan = FormatPlan.uniform(act_format_from_name(args.act))
        except ValueError as e:
            raise LowbitError(f"--act: {e}") from None
    if args.outlier_threshold is not None:
        if plan is None:
            raise LowbitError("--outlier-threshold needs quantized activations (--act or a recipe)")
        plan = FormatPlan(tuple((p, None if f is None else f.with_threshold(args.outlier_threshold))
                                for p, f in plan.rules),
                          None if plan.default is None else plan.default.with_threshold(args.outlier_threshold),
                          plan.origin)
    return plan


def _smooth(args: argparse.Namespace, recipe):
    from ..methods.smoothquant import SmoothConfig

    base = recipe.configs.get("smooth", SmoothConfig()) if recipe is not None else SmoothConfig()
    if args.alpha is None:
        return base
    try:
        alpha = None if args.alpha == "search" else float(args.alpha)
        return SmoothConfig(alpha, base.alphas)
    except ValueError as e:
        raise LowbitError(f"--alpha: {e}" if "alpha" in str(e) else f"--alpha must be a number in [0, 1] or "
                          f"'search', got {args.alpha!r}") from None


def _rotation(args: argparse.Namespace, recipe):
    """The rotation: the recipe's, or --rotate KIND; --rotate-seed applied. One line on bad values."""
    from ..rotations.plan import RotationConfig

    base = recipe.rotation if recipe is not None else None
    if args.rotate is None and args.rotate_seed is None:
        return base
    seed = base.seed if base is not None else 0
    if args.rotate_seed is not None:
        try:
            seed = int(args.rotate_seed)
        except ValueError:
            raise LowbitError(f"--rotate-seed must be an integer, got {args.rotate_seed!r}") from None
    if args.rotate is None and base is None:
        raise LowbitError("--rotate-seed needs --rotate KIND (or a rotating recipe)")
    kind = args.rotate if args.rotate is not None else base.kind
    try:
        if base is None:
            return RotationConfig(kind=kind, seed=seed)
        return dataclasses.replace(base, kind=kind, seed=seed)     # the recipe's other settings (SpinQuant's) kept
    except ValueError as e:
        raise LowbitError(f"--rotate: {e}") from None


def _config(args: argparse.Namespace, loaded=None) -> QuantizeConfig:
    """The config the flags describe. A llama.cpp mix needs the model (`loaded`); before the load
    its base type stands in, so every flag is checked before the slow part."""
    from ..data.calibration import CalibConfig
    from ..formats import GGUFFormat
    from ..plans.gguf_mixes import MIXES

    recipe = _recipe(args)
    if recipe is not None:
        fmt, plan = None, recipe.weights
    else:
        fmt = format_from_args(args)
        plan = plan_from_args(args, *(() if loaded is None else (loaded.model.config, loaded.spec)))
    if fmt is None and plan is None:   # a mix, not yet built
        fmt = GGUFFormat(MIXES[args.type].base_type if MIXES[args.type].base_type not in ("F32", "F16") else "Q8_0")
    gguf = args.format == "gguf"
    clip = _clip(args)
    if gguf and args.clip == "mse":
        raise LowbitError("--clip applies to integer/NF/FP formats; GGUF types search their own block scales")
    method = recipe.method if recipe is not None else _method(args)
    steps = recipe.configs if recipe is not None else {}
    if args.alpha is not None and "smooth" not in method.split("+"):
        raise LowbitError("--alpha applies to SmoothQuant (--method smooth, or a smoothing recipe)")
    try:
        return QuantizeConfig(
            fmt=fmt, plan=plan, method=method,
            rtn=steps.get("rtn", RtnConfig(clip="none" if gguf else clip)),
            gptq=steps.get("gptq", GptqConfig(block_size=args.block_size, damp=args.damp, act_order=args.act_order,
                                              clip="none" if gguf else clip)),
            # GGUF: AWQ's x^α candidates judged on the real block types (each a full GGUF round trip)
            awq=steps.get("awq", AwqConfig(clip=clip == "mse" and not gguf, duo=args.duo and not gguf,
                                           clip_sweeps=args.clip_sweeps)),
            smooth=_smooth(args, recipe), act_plan=_act_plan(args, recipe), rotation=_rotation(args, recipe),
            kv=recipe.kv if recipe is not None else None,
            incoherence=recipe.incoherence if recipe is not None else None,
            inputs=args.inputs,
            calib=CalibConfig(samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                              allow_eval_text=args.allow_eval_text),
            sink_weight=args.sink_weight, quantize_head=args.quantize_head, skip=tuple(args.skip), walk=args.walk,
            outliers=parse_share(args.outliers, "--outliers"), outlier_layout=args.outlier_layout)
    except ValueError as e:
        raise LowbitError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from ..data.text import read_text
    from ..export.lowbit_dir import check_out, save_quantized
    from ..export.lowbit_stream import LayerStream
    from ..models.lazy import load_lazy
    from ..models.load import load
    from ..models.registry import resolve
    from ..quantize import calibration_samples

    config = _config(args)
    if _method(args) == "rtn" and args.format == "gguf" and args.calib:
        raise LowbitError("--method rtn uses no calibration; for GGUF types weighted by an imatrix use --method imatrix")
    if config.calibrated and not args.calib:
        if config.method not in CALIBRATED:
            static = next(f.name for f in config.act_formats if f.static)
            raise LowbitError(f"static activation format {static} takes its scale from calibration: give --calib PATH")
        raise LowbitError(f"--method {config.method} needs --calib PATH (a calibration text file)")
    if args.offload and not Path(args.offload).is_dir():
        raise LowbitError(f"--offload {args.offload} is not a directory")
    check_out(args.out, args.overwrite)
    if args.workers < 1:
        raise LowbitError(f"--workers must be at least 1, got {args.workers}")
    if args.lazy and (args.workers > 1 or int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1):
        raise LowbitError("--lazy writes each layer as it finishes: not with --workers or torchrun yet")
    if args.workers > 1:
        if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
            raise LowbitError("--workers launches torchrun itself: under torchrun, drop --workers")
        return launch(args, config)
    from ..calibration import distributed

    workers = distributed.from_environment()           # a rank of a torchrun launch, or None
    ckpt = resume_dir(args, config) if workers is None else None
    text = read_text(args.calib) if config.calibrated else None   # cheap checks before the slow load
    loaded = load_lazy(resolve(args.model)) if args.lazy else load(args.model)
    config = _config(args, loaded)
    samples = calibration_samples(loaded, text, config.calib) if text is not None else None
    predicted = check_memory(loaded, config, samples, args.offload)
    stream = LayerStream(loaded, Path(args.out), args.overwrite) if args.lazy else None
    try:
        result = quantize(loaded, config, samples, offload=Path(args.offload) if args.offload else None,
                          checkpoint=ckpt, resume=args.resume, workers=workers,
                          progress=workers is None or not workers.rank,
                          on_layer_done=stream.add_layer if stream else None)
    except BaseException as e:
        if stream is not None:
            stream.abort()
        if isinstance(e, LowbitError) and ckpt is not None and not args.resume:
            shutil.rmtree(ckpt, ignore_errors=True)    # a refused run cannot be resumed into success; a crash can
        raise
    if workers is not None:
        distributed.close()                            # every rank holds the same model now
        if workers.rank:
            return 0                                   # rank 0 writes and reports
    if not result.linears:
        raise LowbitError("no linear was quantized (check --skip)")
    method = config.to_dict()
    if result.walk:
        method["walk"] = result.walk                  # what "auto" resolved to
    if text is not None:
        method["calibration"].update(text=text.origin, text_sha256=text.sha256)
    if result.spin is not None:
        method["rotation"]["spin_result"] = {"losses": list(result.spin.losses), "seconds": result.spin.seconds,
                                             "stopped_early": result.spin.stopped_early}
    method["command"] = recorded_command(getattr(args, "argv", []))
    out = stream.finish(method) if stream is not None else \
        save_quantized(loaded, method, args.out, overwrite=args.overwrite)
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)       # the output is whole: the checkpoint has served
    if args.write_plan:
        config.format_plan.save(args.write_plan)
    if args.save_rotation and result.rotations is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in result.rotations.items()}, args.save_rotation)
    if args.save_plan and result.plan is not None:
        result.plan.meta.update(calibration=method["calibration"])
        result.plan.save(args.save_plan)
    from ..eval.size import size_report

    size = size_report(loaded.model)
    worst = max(result.linears, key=lambda r: r.rel_error)
    label = config.method + ("+mse-clip" if _clip(args) == "mse" and args.format != "gguf" else "")
    counts: dict[str, int] = {}
    for r in result.linears:
        share = config.plan.outlier_share(r.name) if config.plan is not None else None
        key = option_name(r.fmt, share or 0.0)                     # dense-and-sparse tensors counted apart
        counts[key] = counts.get(key, 0) + 1
    fmt_label = config.fmt.name if config.plan is None else \
        f"{config.plan.origin}: " + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
    losses = [(r.proxy_loss, r.rtn_proxy_loss) for r in result.linears if r.proxy_loss is not None]
    gain = (sum(b for _, b in losses) / max(sum(a for a, _ in losses), 1e-30)) if losses else None
    print(table(["model", "method", "format", "linears", "bits/weight", "model bits/param", "seconds",
                 "worst rel. error", "RTN/ours proxy loss"],
                [[loaded.source.name, label, fmt_label, len(result.linears), size.bits_per_weight,
                  size.model_bits_per_weight, result.seconds, f"{worst.rel_error:.4f} ({worst.name})",
                  "-" if gain is None else f"{gain:.2f}x"]]))
    print(f"saved to {out}")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "model": args.model, "method": method, "format": fmt_label, "out": str(out),
            "linears": len(result.linears), "seconds": result.seconds,
            "bits_per_weight": size.bits_per_weight, "model_bits_per_weight": size.model_bits_per_weight,
            "rel_error": {r.name: r.rel_error for r in result.linears},
            "proxy_loss": {r.name: [r.proxy_loss, r.rtn_proxy_loss] for r in result.linears if r.proxy_loss is not None},
            "timings": [vars(t) for t in result.timings],
            "predicted_peak_bytes": predicted.total, "predicted_peak_parts": dict(predicted.parts)}, indent=1))
    return 0
