"""The KV-cache flags shared by `lowbit eval` and `lowbit generate`, and their validation."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LowbitError

KV_CONVENTION = ("KV cache {name}: K ({rope}) and V quantized as they are written, every attention read sees "
                 "the de-quantized values{residual}; each window's tokens attend to the quantized K/V of every "
                 "earlier token of that window, as a token-by-token generation's cache would hold them")


def add_kv_args(p: argparse.ArgumentParser) -> None:
    from ..kv.config import METHODS
    from ..kv.key_scales import CALIB_SAMPLES, CALIB_SEQ_LEN

    g = p.add_argument_group("KV cache (quantized as generation would store it; docs/kv_cache.md)")
    g.add_argument("--kv", choices=METHODS, default=None, help="quantize the KV cache with this method")
    g.add_argument("--kv-bits", type=float, default=None,
                   help="bits per cached value: int/kivi 2, 3, 4, 8; turboquant 2, 2.5, 3, 3.5, 4; "
                        "16 = the float cache")
    g.add_argument("--kv-group", type=int, default=None,
                   help="int: values per group along head_dim (default 64, or head_dim where 64 does not divide it; per-channel: tokens, default 32); "
                        "kivi: K's tokens per group and V's group along head_dim (default 32)")
    g.add_argument("--kv-residual", type=int, default=0, metavar="R",
                   help="keep the newest R tokens in float (KIVI's residual window; default 0)")
    g.add_argument("--kv-sink", type=int, default=0, metavar="S",
                   help="keep the sequence's first S tokens in float (attention sinks; default 0)")
    g.add_argument("--kv-axis", choices=("token", "channel"), default="token", help="int only: K and V per token "
                   "(default) or per channel in groups of tokens")
    g.add_argument("--kv-sym", action="store_true", help="int only: a symmetric grid (default asymmetric)")
    g.add_argument("--kv-qjl", action="store_true", help="turboquant only: K's last bit as the QJL residual")
    g.add_argument("--kv-norm-correct", nargs="?", const="kv", default="", choices=("k", "v", "kv"),
                   help="turboquant only: store the norms of K, V or both (bare flag: kv) so each de-quantized "
                        "vector keeps its projection (undoes the Lloyd–Max shrinkage of scores and outputs)")
    g.add_argument("--kv-center-k", action="store_true", help="turboquant, int per token: K less its per-channel "
                   "mean over the first write (stored once per head)")
    g.add_argument("--kv-pre-rope", action="store_true", help="quantize K before RoPE (KVQuant): turned back by "
                   "its position's angle when written, turned again on read, so per-channel statistics hold at "
                   "any context length")
    g.add_argument("--kv-scale-k", default=None, metavar="CALIB",
                   help="turboquant, int per token: divide K by per-channel scales (E[k²]/E[q²])^1/4 before "
                        "quantizing, so the error lands where queries are small; CALIB: calibration text (a file "
                        "or HF dataset; %d windows of %d tokens, about a minute) or a .safetensors file of "
                        "--kv-scales-out" % (CALIB_SAMPLES, CALIB_SEQ_LEN))
    g.add_argument("--kv-scales-out", default=None, metavar="FILE",
                   help="write the statistics --kv-scale-k measured (a .safetensors file, reusable as CALIB)")
    g.add_argument("--kv-seed", default="0", help="turboquant's rotation and QJL seed (default 0)")


def kv_config(args: argparse.Namespace, ctx: int | None = None):
    """The KvCacheConfig the flags ask for, or None for the float cache. One-line LowbitError on bad input."""
    from ..kv.config import KvCacheConfig

    if args.kv is None:
        if args.kv_bits is not None and args.kv_bits != 16:
            raise LowbitError("--kv-bits needs --kv METHOD (int, kivi, turboquant)")
        if args.kv_scale_k is not None:
            raise LowbitError("--kv-scale-k needs --kv METHOD (turboquant, int)")
        return None
    if args.kv_scales_out is not None and args.kv_scale_k is None:
        raise LowbitError("--kv-scales-out needs --kv-scale-k CALIB")
    if args.kv_bits is None:
        raise LowbitError(f"--kv {args.kv} needs --kv-bits")
    if args.kv_bits == 16:
        return None
    try:
        seed = int(args.kv_seed)
    except ValueError:
        raise LowbitError(f"--kv-seed must be an integer, got {args.kv_seed!r}") from None
    bits = int(args.kv_bits) if float(args.kv_bits).is_integer() else args.kv_bits
    try:
        config = KvCacheConfig(args.kv, bits, args.kv_group, args.kv_residual, args.kv_axis, args.kv_sym,
                               args.kv_qjl, seed, args.kv_center_k, args.kv_scale_k is not None, args.kv_sink,
                               args.kv_pre_rope, args.kv_norm_correct)
        if ctx is not None:
            config.check_context(ctx)
    except ValueError as e:
        raise LowbitError(str(e)) from None
    return config


def key_scales(args: argparse.Namespace, loaded, config):
    """{layer: [H, D]} K scales for scale_k (measured on --kv-scale-k's text, or read from its file), or None."""
    if config is None or not config.scale_k:
        return None
    from ..kv import key_scales as ks

    d = loaded.dims
    source = args.kv_scale_k
    try:
        if source.endswith(".safetensors"):
            if not Path(source).is_file():
                raise LowbitError(f"--kv-scale-k {source}: no such file")
            stats = ks.load(source)
        else:
            from ..data.text import EVAL_TEXTS, read_text

            text = read_text(source)
            if text.is_eval_text:       # the flag that overrides this elsewhere (--allow-eval-text) is not offered here
                raise LowbitError(f"--kv-scale-k: refusing to measure K scales on the evaluation text "
                                  f"({EVAL_TEXTS[text.sha256]}, {text.origin}); pass a calibration text")
            stats = ks.measure_text(loaded, text)
            if args.kv_scales_out:
                ks.save(stats, args.kv_scales_out, loaded.source.name)
        stats.check(d.n_layers, d.kv_heads, d.head_dim)
        return stats.scales(config.center_k, pre_rope=config.pre_rope)
    except ValueError as e:
        raise LowbitError(str(e)) from None


def install(loaded, config, scales=None) -> str:
    """Make loaded.model read its K/V as the packed cache would; the convention line. LowbitError
    (one line) when the model already quantizes its cache or its attention cannot be served."""
    from ..kv.attention import install_kv_cache

    if any(getattr(m, "lowbit_kv", None) is not None for m in loaded.model.modules()):
        raise LowbitError("this model already quantizes its KV cache (its recipe's kv_cache): --kv cannot be added")
    try:
        install_kv_cache(loaded.model, loaded.spec, config, scales)
    except ValueError as e:
        raise LowbitError(f"--kv on {loaded.spec.family}: {e}") from None
    first = "the first token" if config.sink == 1 else f"the first {config.sink} tokens"
    kept = ([f"{first} of each window"] if config.sink else []) + (
        [f"the newest {config.residual} tokens"] if config.residual else [])
    residual = f", except {' and '.join(kept)} kept in float" if kept else ""
    return KV_CONVENTION.format(name=config.name, residual=residual,
                                rope="before RoPE, turned back on read" if config.pre_rope else "after RoPE")
