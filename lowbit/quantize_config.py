"""What `quantize` is told and what it returns: QuantizeConfig (method, formats, options; validated
on construction, recorded by to_dict), LinearReport and QuantizeResult. The verb is lowbit.quantize."""
from __future__ import annotations

from dataclasses import dataclass, field

from .data.calibration import CalibConfig
from .formats import Format, GGUFFormat
from .formats.activation import ActFormat
from .methods.awq import AwqConfig, AwqPlan
from .methods.gptq import GptqConfig
from .methods.rtn import RtnConfig
from .methods.smoothquant import SmoothConfig
from .nn.kv_attention import KvQuant
from .plans import FormatPlan
from .rotations.incoherence import IncoherenceConfig
from .rotations.plan import RotationConfig
from .solve_act import SmoothRecord

METHODS = ("rtn", "imatrix", "gptq", "awq", "awq+gptq", "smooth", "smooth+gptq")
CALIBRATED = ("imatrix", "gptq", "awq", "awq+gptq", "smooth", "smooth+gptq")
INPUTS = ("quantized", "float")  # what each layer's calibration inputs come from
# The first token of a sequence is an attention sink with a hidden state unlike any other;
# in Σ xᵀx it is 1 token in seq_len, yet every later token attends to it. GPTQ trading its
# error for the others' made SmolLM2 W4 g64 worse than RTN (4 windows: 42.4 vs 36.0, FP 24.2);
# counting each sample's first token this many times gave 30.1.
SINK_WEIGHT = 100.0
# GPTQ as `lowbit quantize` runs it by default (act order with static groups: the best benchmarked rows,
# docs/results/calibrated.md); the planner's GPTQ-rounded losses round the same way
QUANTIZE_GPTQ = GptqConfig(act_order=True)
WALKS = ("auto", "sequential", "two-pass")   # calibration/walker.py; auto: choose_walk


@dataclass(frozen=True)
class QuantizeConfig:
    """What to do to a model: method, formats (a plan, or one format for all), method options.

    fmt: the format of every linear when `plan` is None; plan: a FormatPlan (fmt then unused).
    skip: fnmatch patterns kept in float ahead of the plan's rules.
    inputs: "quantized" (each layer calibrated on the outputs of the already-quantized layers,
        the walker's convention) or "float" (on the float model's: every write-back waits for
        the end of the walk).
    act_plan: a FormatPlan of ActFormats for the quantized linears' inputs (None: weight-only).
    """

    fmt: Format | None = None
    method: str = "rtn"
    rtn: RtnConfig = field(default_factory=RtnConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    awq: AwqConfig = field(default_factory=AwqConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    sink_weight: float = SINK_WEIGHT    # weight of each sample's first token in the Hessians
    quantize_head: bool = False
    skip: tuple[str, ...] = ()          # fnmatch patterns on full module names kept in float
    walk: str = "auto"                  # one of WALKS
    plan: FormatPlan | None = None
    inputs: str = "quantized"           # one of INPUTS
    act_plan: FormatPlan | None = None
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    rotation: RotationConfig | None = None   # fused rotations applied before anything else
    kv: KvQuant | None = None                # simulated KV-cache quantization (nn.kv_attention)
    incoherence: IncoherenceConfig | None = None   # QuIP's randomized Hadamards on both sides of each W
    outliers: float = 0.0                    # share of each weight kept in float16 beside GPTQ (dense-and-sparse)
    outlier_layout: str = "entries"          # "entries" (single weights) or "columns" (OWQ: whole input columns)

    def __post_init__(self):
        if (self.fmt is None) == (self.plan is None):
            raise ValueError("give a format or a plan (exactly one)")
        if self.inputs not in INPUTS:
            raise ValueError(f"unknown inputs {self.inputs!r} (known: {', '.join(INPUTS)})")
        if self.inputs == "float" and self.walk == "sequential":
            raise ValueError("float inputs need the two-pass walk (the sequential walk runs each group quantized)")
        if self.method == "imatrix" and not any(isinstance(f, GGUFFormat) for f in self._formats()):
            raise ValueError("method imatrix weights the GGUF types' scale search; the plan has no GGUF type")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if isinstance(self.sink_weight, bool) or not isinstance(self.sink_weight, (int, float)) \
                or not 0 <= self.sink_weight < float("inf"):
            raise ValueError(f"sink weight must be a finite number >= 0, got {self.sink_weight!r}")
        if self.walk not in WALKS:
            raise ValueError(f"unknown walk {self.walk!r} (known: {', '.join(WALKS)})")
        if self.walk == "sequential" and ("awq" in self.steps or "smooth" in self.steps):
            raise ValueError("AWQ and SmoothQuant need the two-pass walk (their v → o scales fold into v before "
                             "v is quantized)")
        if self.incoherence is not None and ("gptq" not in self.steps or self.inputs == "float"):
            raise ValueError("incoherence runs in the calibrated walk before GPTQ: use --method gptq (quantized inputs)")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) \
                or not 0 <= self.outliers < 0.1:
            raise ValueError(f"the outlier share must be a number in [0, 0.1) (0.5% = 0.005), got {self.outliers!r}")
        if self.outlier_layout not in ("entries", "columns"):
            raise ValueError(f"unknown outlier layout {self.outlier_layout!r} (known: entries, columns)")
        planned_outliers = self.plan is not None and any(share for _, share in self.plan.outliers)
        if (self.outliers or planned_outliers) and ("gptq" not in self.steps or self.inputs == "float"
                              or any(isinstance(f, GGUFFormat) for f in self._formats())):
            raise ValueError("dense-and-sparse outliers are chosen on the Hessian and kept by GPTQ: use --method gptq "
                             "(quantized inputs) with non-GGUF formats")
        if any(not isinstance(f, Format) for f in self._formats()):
            raise ValueError("the weight plan holds an activation format (a8-…): plan activations separately")
        if any(not isinstance(f, ActFormat) for f in self.act_formats):
            raise ValueError("the activation plan holds a weight format: activation formats are a<b>-token|tensor|"
                             "static|g<N>-sym|asym")

    @property
    def format_plan(self) -> FormatPlan:
        """The plan in force: `plan`, or `fmt` for every tensor; `skip` kept float ahead of either."""
        base = self.plan if self.plan is not None else FormatPlan.uniform(self.fmt)
        return base.keep_float(self.skip) if self.skip else base

    def _formats(self) -> list[Format]:
        plan = self.plan if self.plan is not None else FormatPlan.uniform(self.fmt)
        return [f for f in (plan.default, *(f for _, f in plan.rules)) if f is not None]

    @property
    def act_formats(self) -> list[ActFormat]:
        plan = self.act_plan
        return [] if plan is None else [f for f in (plan.default, *(f for _, f in plan.rules)) if f is not None]

    @property
    def static_acts(self) -> bool:
        """Whether some activation format takes its scale from calibration."""
        return any(f.static for f in self.act_formats)

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(self.method.split("+"))

    @property
    def calibrated(self) -> bool:
        spin = self.rotation is not None and self.rotation.spin_steps > 0
        return self.method in CALIBRATED or self.static_acts or spin

    def to_dict(self) -> dict:
        d = {"method": self.method, "format": None if self.fmt is None else self.fmt.to_dict(),
             "rtn": vars(self.rtn).copy(), "quantize_head": self.quantize_head, "skip": list(self.skip)}
        if self.plan is not None:
            d["plan"] = self.plan.to_dict()
        if "gptq" in self.steps:
            d["gptq"] = vars(self.gptq).copy()
        if "awq" in self.steps:
            d["awq"] = vars(self.awq).copy()
        if "smooth" in self.steps:
            d["smooth"] = {"alpha": "search" if self.smooth.alpha is None else self.smooth.alpha,
                           "alphas": list(self.smooth.alphas)}
        if self.act_plan is not None:
            d["activations"] = self.act_plan.to_dict()
        if self.rotation is not None:
            d["rotation"] = self.rotation.to_dict()
        if self.kv is not None:
            d["kv_cache"] = self.kv.to_dict()
        if self.incoherence is not None:
            d["incoherence"] = vars(self.incoherence).copy()
        if self.outliers:
            d["outliers"] = {"share": self.outliers, "layout": self.outlier_layout}
        if self.calibrated:
            d["calibration"] = vars(self.calib).copy()
            d["sink_weight"] = self.sink_weight
            d["walk"] = self.walk
            d["inputs"] = self.inputs
        return d


@dataclass(frozen=True)
class LinearReport:
    """One quantized linear: where it is, its format, its relative weight error."""

    name: str
    shape: tuple[int, int]
    fmt: str
    rel_error: float                    # ||W_f - W_dq||_F / ||W_f||_F (W_f after AWQ scaling)
    proxy_loss: float | None = None     # tr(E H Eᵀ) on the calibration inputs (calibrated methods)
    rtn_proxy_loss: float | None = None  # the same for plain RTN of the unscaled weight


@dataclass(frozen=True)
class QuantizeResult:
    config: QuantizeConfig
    linears: tuple[LinearReport, ...]
    seconds: float
    plan: AwqPlan | None = None         # the AWQ scales (and clips) that were folded in
    timings: tuple = ()                 # walker LayerTiming per layer (calibrated methods)
    walk: str | None = None             # the walk used (calibrated methods): "sequential" | "two-pass"
    smoothing: SmoothRecord | None = None  # SmoothQuant's α and scales per layer and group
    spin: object = None                 # rotations.spinquant.SpinResult: the learned R1/R2 and loss curve
    rotations: dict | None = None       # {"R1": [hidden, hidden], "R2": [hd, hd]} float64, as fused
