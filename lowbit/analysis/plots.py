"""The report's figures, drawn with matplotlib and returned as base64 PNG (inlined in the page)."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig(width=9.0, height=3.6, integer_x=True):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.grid(True, alpha=0.3)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def residual_plot(massive: dict) -> str:
    """Largest |h| per layer (1st, 2nd, 3rd) and the median, with the massive dimensions marked."""
    rows = massive["per_layer"]
    layers = [r["layer"] for r in rows]
    fig, ax = _fig()
    for rank, style in enumerate(["-", "--", ":"]):
        ax.plot(layers, [r["top"][rank]["value"] if len(r["top"]) > rank else np.nan for r in rows], style,
                color="black", label=f"top {rank + 1} |h|")
    ax.plot(layers, [r["median_abs"] for r in rows], color="gray", label="median |h|")
    for i, d in enumerate(massive["dims"][: len(COLORS)]):
        profile = massive["dim_profiles"].get(str(d["dim"]))
        if profile is None:
            continue
        ax.plot(layers, profile, color=COLORS[i], lw=1, alpha=0.8)
        ax.scatter(d["layers"], [profile[l] for l in d["layers"]], color=COLORS[i], zorder=3, s=22,
                   label=f"dim {d['dim']} (dots: massive)")
    ax.axhline(massive["thresholds"]["min_value"], color="#d62728", lw=0.8, ls="-.", label="100 (threshold)")
    ax.set_yscale("log")
    ax.set_xlabel("layer (output of the decoder layer)")
    ax.set_ylabel("|activation|")
    ax.set_title("Residual stream: the largest values per layer")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def heatmap(values: list[list[float]], title: str, features: list[int], massive: list[int]) -> str:
    """log10 of channel absmax [layers x channels]; outlier features and massive dims marked on top."""
    data = np.log10(np.maximum(np.asarray(values, dtype=float), 1e-6))
    fig, ax = plt.subplots(figsize=(9.0, 3.4))
    im = ax.imshow(data, aspect="auto", cmap="magma", interpolation="nearest",
                   vmin=float(np.percentile(data, 1)), vmax=float(data.max()))
    fig.colorbar(im, ax=ax, label="log10 max |x|")
    top = -0.5 - 0.04 * data.shape[0]
    if features:
        ax.scatter(features, [top] * len(features), marker="v", color="#2ca02c", s=30, clip_on=False,
                   label="outlier features")
    if massive:
        ax.scatter(massive, [top - 0.05 * data.shape[0]] * len(massive), marker="v", color="#1f77b4", s=30, clip_on=False,
                   label="massive-activation dims")
    if features or massive:
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 1.22), ncol=2, frameon=False)
    ax.set_ylim(data.shape[0] - 0.5, -0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("channel (hidden dimension)")
    ax.set_ylabel("layer")
    ax.set_title(title, loc="left", fontsize=10, pad=14)
    return _png(fig)


def feature_plot(features: dict) -> str:
    """Per layer: the largest |x| over all dimensions, and at each outlier feature's dimension."""
    fig, ax = _fig()
    prof = features["max_abs_profile"]
    ax.plot(range(len(prof)), prof, color="gray", lw=2, label="max |x| (any dimension)")
    for i, (dim, values) in enumerate(list(features["feature_profiles"].items())[: len(COLORS)]):
        ax.plot(range(len(values)), values, color=COLORS[i], marker="o", ms=3, label=f"dim {dim}")
    ax.axhline(features["thresholds"]["magnitude"], color="black", ls="--", lw=0.8, label="magnitude threshold")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |x| over positions")
    ax.set_title("Inputs of the attention and MLP linears: outlier-feature dimensions")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def down_plot(super_weights: dict) -> str:
    """The seeds' picture: max |input| and |output| of each layer's down projection, finds marked."""
    first = super_weights["rounds"][0]
    fig, ax = _fig()
    n = len(first["max_abs_input"])
    ax.plot(range(n), first["max_abs_input"], marker="o", ms=3, label="max |input| of down_proj")
    ax.plot(range(n), first["max_abs_output"], marker="s", ms=3, label="max |output| of down_proj")
    for c in super_weights["found"]:
        ax.annotate(f"W[{c['row']},{c['col']}]", xy=(c["layer"], abs(c["y"])), xytext=(0, 12),
                    textcoords="offset points", ha="center", fontsize=8, color="#d62728",
                    arrowprops={"arrowstyle": "->", "color": "#d62728"})
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("magnitude")
    ax.set_title("Down projection: input and output spikes (round 1), super-weight candidates marked")
    ax.legend(fontsize=8)
    return _png(fig)


def verify_plot(verification: dict) -> str:
    """Perplexity: float model, each candidate zeroed, and its random control."""
    checks = verification["checks"]
    fig, ax = _fig(height=3.2, integer_x=False)
    x = np.arange(len(checks))
    ax.bar(x - 0.2, [c["zeroed"]["ppl"] for c in checks], 0.4, color="#d62728", label="candidate(s) zeroed")
    ax.bar(x + 0.2, [c["control"]["ppl"] for c in checks], 0.4, color="#7f7f7f", label="random control zeroed")
    ax.axhline(verification["float_ppl"], color="black", ls="--", lw=1, label="float model")
    ax.set_xticks(x, [c["weights"] for c in checks], fontsize=8)
    values = [c[k]["ppl"] for c in checks for k in ("zeroed", "control")] + [verification["float_ppl"]]
    if max(values) > 3 * min(values):
        ax.set_yscale("log")
    ax.set_ylabel("perplexity (probe)")
    ax.set_title("Does it matter? Perplexity with the candidate zeroed vs. random weights zeroed")
    ax.legend(fontsize=8)
    return _png(fig)


def sensitivity_plot(sensitivity: dict, top: int = 20) -> str:
    """Horizontal bars: KLD when only that unit is quantized, most sensitive on top."""
    ranked = sensitivity["ranking"][:top]
    rows = {(r["layer"], r["linear"]): r for r in sensitivity["rows"]}
    labels = [f"L{r['layer']}" + ("" if r["linear"] == "all" else f" {r['linear'].split('.')[-1]}") for r in ranked]
    fig, ax = _fig(height=max(2.5, 0.28 * len(ranked) + 1), integer_x=False)
    y = np.arange(len(ranked))
    fmts = sensitivity["formats"]
    h = 0.8 / len(fmts)
    for i, name in enumerate(fmts):
        ax.barh(y + i * h, [rows[(r["layer"], r["linear"])][name]["kld"] for r in ranked], h, label=name,
                color=COLORS[i % len(COLORS)])
    ax.set_yticks(y + 0.4 - h / 2, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KL divergence to the float model (nats)")
    ax.set_title(f"Sensitivity: only this {sensitivity['mode']} quantized (most sensitive first)")
    ax.legend(fontsize=8)
    return _png(fig)


def levels_plot(activations: dict, bits: str) -> str:
    """Median effective levels per linear input and layer, per-tensor vs per-token scaling."""
    fig, ax = _fig()
    names = sorted({r["input_of"][0] for r in activations["inputs"]}, key=lambda n: [r["input_of"][0] for r in activations["inputs"]].index(n))
    for i, name in enumerate(names):
        rows = [r for r in activations["inputs"] if r["input_of"][0] == name]
        layers = [r["layer"] for r in rows]
        short = "/".join(p.split(".")[-1] for p in rows[0]["input_of"])
        ax.plot(layers, [r["levels"][bits]["per_tensor"]["median"] for r in rows], color=COLORS[i], label=f"{short} per-tensor")
        ax.plot(layers, [r["levels"][bits]["per_token"]["median"] for r in rows], color=COLORS[i], ls="--",
                label=f"{short} per-token")
    ax.axhline(2 ** int(bits), color="black", lw=0.8, ls=":", label=f"all {2 ** int(bits)} levels")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("levels used by the median channel")
    ax.set_title(f"Effective int{bits} levels of the median channel of each linear input")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def weights_plot(weights: dict) -> str:
    """absmax / std of every linear weight, per layer and linear kind."""
    fig, ax = _fig()
    names = list(dict.fromkeys(r["linear"] for r in weights["linears"]))
    for i, name in enumerate(names):
        rows = [r for r in weights["linears"] if r["linear"] == name]
        ax.plot([r["layer"] for r in rows], [r["absmax_over_std"] for r in rows], color=COLORS[i % len(COLORS)],
                marker="o", ms=2, label=name.split(".")[-1])
    ax.set_xlabel("layer")
    ax.set_ylabel("max |W| / std(W)")
    ax.set_title("Weight outliers: how far the largest weight is from the typical one")
    ax.legend(fontsize=7, ncol=4)
    return _png(fig)
