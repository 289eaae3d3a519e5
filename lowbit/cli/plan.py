"""`lowbit plan`: per-tensor formats at a target size, written as a plan file for `lowbit quantize --plan`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LowbitError
from ..log import logger
from .common import parse_share
from .table import table


def add_parser(sub) -> None:
    from ..plans.gguf_mixes import K_TYPES
    from ..plans.planner import DEFAULT_FORMATS, LOSSES

    p = sub.add_parser("plan", help="per-tensor formats that minimise the predicted loss at a target size",
                       description="Choose a format for every decoder linear so that the summed predicted loss is "
                                   "least at a size of at most --target-bpw bits per weight (lowbit's count: codes, "
                                   "scales and zero-points of the quantized linears). Writes a plan file; apply it "
                                   "with `lowbit quantize MODEL --plan FILE --method gptq --calib PATH`.")
    p.add_argument("model", help="a model name, a .gguf file or an HF directory (a float model)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-bpw", type=float, metavar="B", help="bits per weight, at most")
    size.add_argument("--like", default=None, metavar="MIX",
                      help="a GGUF file no larger than llama.cpp's MIX (Q2_K, Q3_K_M, Q4_K_S, ...): the decoder "
                           "linears get at most the bits that mix gives them, the embedding and head the mix's own "
                           "types; candidates default to the K-quant types (apply with --method gptq, then "
                           "`lowbit export DIR --format gguf`)")
    p.add_argument("--formats", default=None,
                   help=f"candidate formats, comma-separated (default: {','.join(DEFAULT_FORMATS)}; with --like: "
                        f"{','.join(K_TYPES)})")
    p.add_argument("--loss", choices=LOSSES, default="fisher",
                   help="fisher (default): each tensor's KLD when it alone is rounded by GPTQ, predicted from one "
                        "gradient pass over --hessian-samples rows (½ Σ g_i (E H Eᵀ)_ii, g the output channels' "
                        "Fisher information with labels drawn from the model); kld-gptq: that KLD measured on the "
                        "probe rows (one evaluation per tensor and format: about twice as long on SmolLM2, longer "
                        "with a large vocabulary); kld: "
                        "measured with the tensor rounded to nearest (for --method rtn); proxy: the Hessian-weighted "
                        "rounding error (one pass, ranks poorly)")
    p.add_argument("--hessian-samples", type=int, default=16, metavar="N",
                   help="with --loss kld-gptq or fisher: rows of --seq-len tokens whose inputs give GPTQ its "
                        "Hessians, drawn apart from the probe rows (default: 16)")
    p.add_argument("--fisher-rows", type=int, nargs=2, default=None, metavar=("N", "L"),
                   help="with --loss fisher: the gradient pass's rows, N rows of L tokens (default: about 8192 "
                        "tokens in rows of 2048, shorter where the model's context or the text is; a tensor's cost "
                        "depends on the context it is used at)")
    p.add_argument("--outlier-shares", default=None, metavar="SHARES",
                   help="also offer each non-GGUF format with these shares of a tensor kept in float16 "
                        "(dense-and-sparse, 48 bits per kept weight, counted in the size), e.g. 0.5%%,1%%; "
                        "apply the plan with --method gptq")
    p.add_argument("--outlier-formats", default=None, metavar="FORMATS",
                   help="offer the outlier shares only beside these candidates, comma-separated (default: all)")
    p.add_argument("--refine", type=int, default=0, metavar="EVALS",
                   help="then refine the plan by a measured search (EvoPress-like): trade bits between tensors, "
                        "keeping a trade when the KLD of the whole model, assembled from every tensor's GPTQ "
                        "rounding (on the Hessians quantize's walk of the plan sums on --hessian-samples rows), "
                        "falls on --refine-rows rows; EVALS evaluations (each a forward of those rows: about 13 s "
                        "on SmolLM2 at 2 x 2048 on 2 cores); summed per-tensor losses miss how errors compound "
                        "(default: 0, no search); the search's plan is kept only if it is also better on held-out "
                        "rows (a long search fits its own rows)")
    p.add_argument("--refine-rows", type=int, nargs=2, default=None, metavar=("N", "L"),
                   help="with --refine: the rows the search judges on (default: 2 rows of 2048 tokens, shorter "
                        "where the model's context or the text is)")
    p.add_argument("--calib", default=None, metavar="PATH",
                   help="text for the probe, Hessian and gradient-pass rows (default: lowbit's built-in sample text, "
                        "about 1,250 tokens; the evaluation text is refused)")
    p.add_argument("--samples", type=int, default=4, help="probe rows (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per probe row (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="where the rows start in the text (default: 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="the plan file to write (.yaml, .yml or .json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary and every predicted loss")
    p.add_argument("--llama-types", default=None, metavar="FILE",
                   help="also write the plan for llama.cpp: a file for `llama-quantize --tensor-type-file FILE` "
                        "(every candidate must be a GGUF type, e.g. --formats Q4_0,Q5_0,Q8_0,Q4_K,Q6_K)")
    p.set_defaults(run=run)


def _items(text: str | None) -> tuple[str, ...]:
    """A comma-separated option's items."""
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _fisher_rows(args: argparse.Namespace, loaded, text) -> tuple[int, int]:
    """--fisher-rows, or the default rows for this model's context and this text (a line says which)."""
    from ..analysis.fisher import gradient_rows
    from ..eval.perplexity import tokenize

    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if args.fisher_rows:
        if context is not None and args.fisher_rows[1] > context:
            raise LowbitError(f"--fisher-rows: rows of {args.fisher_rows[1]} tokens are longer than the model's "
                              f"context ({context} positions)")
        return tuple(args.fisher_rows)
    n, length = gradient_rows(context, tokenize(loaded.tokenizer, text.text).numel())
    logger.info("Fisher gradient pass: %d rows of %d tokens (--fisher-rows to choose)", n, length)
    return n, length


def _refine(args: argparse.Namespace, loaded, text, plan, config):
    """(the refined plan, the search's result, its rows (N, L)): every option GPTQ-rounded once, then the search."""
    from ..data.calibration import CalibConfig
    from ..eval.perplexity import tokenize
    from ..analysis.refine import AssembledKLD, refine, round_all, walked_hessians
    from ..plans.search import SearchConfig
    from ..quantize import calibration_samples

    context = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    n, length = args.refine_rows or (2, min(2048, context, tokenize(loaded.tokenizer, text.text).numel() // 2))
    # the options rounded on the Hessians quantize's walk of the knapsack's plan sums (analysis/refine.py says why)
    h_rows = calibration_samples(loaded, text, CalibConfig(args.hessian_samples, args.seq_len, args.seed + 2))
    library = round_all(loaded.model, [c.name for c in plan.choices], config.candidates(), config.outlier_shares,
                        config.outlier_beside(), walked_hessians(loaded, plan, h_rows))
    scorer = AssembledKLD(loaded.model, calibration_samples(loaded, text, CalibConfig(n, length, args.seed + 3)))
    # held-out rows: the search's plan is kept only if it is better there too (a long search fits its own rows)
    holdout = AssembledKLD(loaded.model, calibration_samples(loaded, text, CalibConfig(n, length, args.seed + 4)))
    new, result, check = refine(plan, loaded.model, library, scorer, config, SearchConfig(evals=args.refine),
                                holdout=holdout)
    return new, result, (n, length), check


def run(args: argparse.Namespace) -> int:
    from ..analysis.default_text import default_text
    from ..analysis.probe import Probe
    from ..data.calibration import CalibConfig
    from ..data.text import read_text
    from ..models.gguf_names import family_for
    from ..models.load import load
    from ..plans.gguf_mixes import K_TYPES, linear_budget_bpw, mix, mix_plan, with_mix_edges
    from ..analysis.fisher import fisher_losses
    from ..analysis.tensor_losses import measured_losses, proxy_losses
    from ..plans.planner import DEFAULT_FORMATS, PlannerConfig, decoder_linears, llama_tensor_types, plan_bits
    from ..quantize import calibration_samples

    formats = args.formats or ",".join(K_TYPES if args.like else DEFAULT_FORMATS)
    try:
        if args.like:
            mix(args.like)                                   # ValueError naming the known mixes
        # with --like the target is the mix's, known once the model is loaded
        shares = tuple(parse_share(t, "--outlier-shares") for t in _items(args.outlier_shares))
        beside = _items(args.outlier_formats) if args.outlier_formats else None
        config = PlannerConfig(1.0 if args.like else args.target_bpw, _items(formats), args.loss, shares, beside)
        calib = CalibConfig(samples=args.samples, seq_len=args.seq_len, seed=args.seed)
        if args.hessian_samples < 1:
            raise ValueError(f"--hessian-samples must be at least 1, got {args.hessian_samples}")
        if args.refine and args.loss not in ("fisher", "kld-gptq"):
            raise ValueError(f"--refine judges models of GPTQ-rounded tensors: use --loss fisher or kld-gptq "
                             f"(not {args.loss})")
        if args.refine < 0 or (args.refine_rows and min(args.refine_rows) < 1):
            raise ValueError("--refine takes a number of evaluations (0: none) and --refine-rows two positive numbers")
        if args.fisher_rows and min(args.fisher_rows) < 1:
            raise ValueError(f"--fisher-rows must be two positive numbers, got {' '.join(map(str, args.fisher_rows))}")
    except ValueError as e:
        raise LowbitError(str(e)) from None
    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise LowbitError(f"--out {out}: a plan file ends in .yaml, .yml or .json")
    if out.exists() and not args.overwrite:
        raise LowbitError(f"--out {out} exists (use --overwrite to replace it)")
    if not out.parent.is_dir():
        raise LowbitError(f"--out {out}: no directory {out.parent}")
    text = read_text(args.calib) if args.calib else default_text()
    loaded = load(args.model)
    rows = calibration_samples(loaded, text, calib)
    names = decoder_linears(loaded.model, loaded.spec)
    shapes = {n: tuple(loaded.model.get_submodule(n).weight.shape) for n in names}
    like = None
    if args.like:
        try:
            like = mix_plan(loaded.model.config, loaded.spec, args.like)
            config = PlannerConfig(linear_budget_bpw(like, shapes), config.formats, config.loss, config.outlier_shares,
                                   config.outlier_formats)
        except (ValueError, KeyError) as e:
            raise LowbitError(f"--like {args.like}: {e}") from None
    fmts = config.candidates()
    fisher_rows = None
    if config.loss in ("kld", "kld-gptq"):
        probe = Probe(loaded.model, loaded.spec, rows)
        gptq = config.loss == "kld-gptq"
        # GPTQ's Hessians from other rows than the probe's: fitted on the rows it is judged on, it would look better
        h_rows = calibration_samples(loaded, text, CalibConfig(args.hessian_samples, args.seq_len, args.seed + 1)) \
            if gptq else None
        losses = measured_losses(loaded.model, loaded.spec, probe, names, fmts, config.outlier_shares,
                                 beside=config.outlier_beside(), rounding="gptq" if gptq else "rtn",
                                 hessian_rows=h_rows)
    elif config.loss == "fisher":
        # the gradient pass and GPTQ's Hessians on rows apart: GPTQ judged on the rows it is fitted to looks better
        fisher_rows = _fisher_rows(args, loaded, text)
        f_rows = calibration_samples(loaded, text, CalibConfig(*fisher_rows, args.seed + 1))
        h_rows = calibration_samples(loaded, text, CalibConfig(args.hessian_samples, args.seq_len, args.seed + 2))
        losses = fisher_losses(loaded.model, loaded.spec, f_rows, names, fmts, config.outlier_shares,
                               config.outlier_beside(), hessian_rows=h_rows)
    else:
        losses = proxy_losses(loaded.model, rows, names, fmts, config.outlier_shares, config.outlier_beside())
    try:
        plan = plan_bits(names, shapes, losses, config)
        search = _refine(args, loaded, text, plan, config) if args.refine else None
        plan = search[0] if search else plan
        if args.llama_types and any(c.outliers for c in plan.choices):
            raise ValueError("the plan keeps outliers in float16: llama.cpp cannot store them (drop --outlier-shares)")
        llama = llama_tensor_types(plan, family_for(loaded.model.config.model_type)) if args.llama_types else None
    except ValueError as e:
        raise LowbitError(str(e)) from None
    if like is None:
        plan.format_plan().save(out)
    else:
        from ..formats import format_from_name

        with_mix_edges({c.name: format_from_name(c.format) for c in plan.choices}, like, args.like,
                       tuple((c.name, c.outliers) for c in plan.choices if c.outliers)).save(out)
    if llama is not None:
        Path(args.llama_types).write_text("\n".join(llama) + "\n")
    summary = plan.summary()
    print(table(["format", "tensors", "weights", "share"],
                [[f, r["tensors"], r["params"], f"{100 * r['params'] / plan.params:.1f}%"]
                 for f, r in sorted(summary["by_format"].items())]))
    target = f"{config.target_bpw:.4f}, {args.like}'s" if like else f"{config.target_bpw:g}"
    print(f"\n{plan.bits_per_weight:.4f} bits per weight (target {target}); predicted loss "
          f"{plan.predicted_loss:.4g} ({config.loss}); wrote {out}")
    print(f"apply it: lowbit quantize {args.model} --plan {out} --method gptq --calib PATH --out DIR"
          + ("; then lowbit export DIR --format gguf --out FILE.gguf" if like else ""))
    if search:
        check = search[3]
        print(f"measured search: KLD {search[1].start_loss:.4g} -> {search[1].loss:.4g} on its rows "
              f"({search[1].evals} evaluations, {search[1].accepted} accepted); on held-out rows "
              f"{check.start_kld:.4g} -> {check.kld:.4g}: "
              + ("kept the search's plan" if check.kept == "search" else "no better there, kept the knapsack's plan"))
    if llama is not None:
        print(f"or with llama.cpp: llama-quantize --tensor-type-file {args.llama_types} MODEL-F32.gguf OUT.gguf Q8_0")
    if args.json:
        Path(args.json).write_text(json.dumps({
            **summary, "model": args.model, "formats": list(config.formats), "probe": {
                "text": text.origin, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
                "hessian_samples": args.hessian_samples if config.loss in ("kld-gptq", "fisher") else None,
                "fisher_rows": list(fisher_rows) if fisher_rows else None},
            "search": {"start_kld": search[1].start_loss, "kld": search[1].loss, "evals": search[1].evals,
                       "accepted": search[1].accepted, "rows": list(search[2]),
                       "holdout": vars(search[3])} if search else None,
            "choices": [vars(c) for c in plan.choices], "losses": plan.losses}, indent=1))
    return 0
