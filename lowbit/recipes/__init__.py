"""Recipes: a whole quantization as a small YAML file — steps, weight plan, activation plan.

    description: "SmoothQuant O1: ..."
    steps:                       # in order; the last weight step rounds (rtn or gptq)
      - rotate: {kind: hadamard, seed: 0}   # optional, first: QuaRot's fused rotations (r2, r4)
      - incoherence: {seed: 0}   # optional, right before gptq: QuIP's Hadamards on both sides of W
      - smooth: {alpha: 0.5}     # or alpha: search (per group, on the quantized output error)
      - rtn: {}
    weights: {default: int8-ch-sym}                # a FormatPlan (tensors: {PATTERN: FORMAT} too)
    activations: {default: a8-token-sym}           # a FormatPlan of activation formats (optional)
    kv_cache: {k: a4-g64-asym, v: a4-g64-asym, rotate: true}   # simulated KV quantization (optional)

Built-ins ship as this package's *.yaml files; `lowbit recipes` lists them; `--recipe FILE.yaml`
takes a user's own. Step options are the fields of the step's config (SmoothConfig, AwqConfig,
GptqConfig, RtnConfig, RotationConfig); anything else is refused in one line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..methods.awq import AwqConfig
from ..methods.gptq import GptqConfig
from ..methods.rtn import RtnConfig
from ..methods.smoothquant import SmoothConfig
from ..plans import FormatPlan
from ..rotations.incoherence import IncoherenceConfig
from ..rotations.plan import RotationConfig

HERE = Path(__file__).resolve().parent
STEP_CONFIGS = {"rotate": RotationConfig, "incoherence": IncoherenceConfig, "smooth": SmoothConfig,
                "awq": AwqConfig, "gptq": GptqConfig, "rtn": RtnConfig}
KEYS = ("description", "steps", "weights", "activations", "kv_cache")


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: method ("+"-joined steps as QuantizeConfig names them), step configs,
    weight plan, activation plan."""

    name: str
    description: str
    method: str
    configs: dict            # {"smooth": SmoothConfig, "gptq": GptqConfig, ...} of the steps given
    weights: FormatPlan
    activations: FormatPlan | None
    kv: object = None        # nn.kv_attention.KvQuant or None

    @property
    def rotation(self) -> RotationConfig | None:
        return self.configs.get("rotate")

    @property
    def incoherence(self) -> IncoherenceConfig | None:
        return self.configs.get("incoherence")

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "method": self.method,
                "rotation": None if self.rotation is None else self.rotation.to_dict(),
                "weights": self.weights.to_dict(),
                "activations": None if self.activations is None else self.activations.to_dict(),
                "kv_cache": None if self.kv is None else self.kv.to_dict()}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def _step(entry, where: str) -> tuple[str, object]:
    """One `- step: {options}` entry -> (step name, its config)."""
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"{where}: a step is `- NAME: {{options}}` with NAME one of {', '.join(STEP_CONFIGS)}")
    (name, options), = entry.items()
    if name not in STEP_CONFIGS:
        raise ValueError(f"{where}: unknown step {name!r} (known: {', '.join(STEP_CONFIGS)})")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"{where}: step {name}: its options are a mapping (`- {name}: {{...}}`), got {str(options)[:40]!r}")
    options = dict(options or {})
    cls = STEP_CONFIGS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{where}: step {name}: unknown option {', '.join(unknown)} (known: {', '.join(known)})")
    if name == "smooth" and options.get("alpha") == "search":
        options["alpha"] = None
    if "alphas" in options:
        options["alphas"] = tuple(options["alphas"])
    try:
        return name, cls(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: step {name}: {e}") from None


def _method(steps: list[str], where: str) -> str:
    """Steps in file order -> QuantizeConfig.method ("smooth" + "rtn" -> "smooth"); a rotation
    comes first and is not part of the method (QuantizeConfig.rotation)."""
    if "rotate" in steps:
        if steps[0] != "rotate":
            raise ValueError(f"{where}: rotate is the first step")
        steps = steps[1:]
    if "incoherence" in steps:
        if steps[-2:] != ["incoherence", "gptq"]:
            raise ValueError(f"{where}: incoherence goes right before gptq")
        steps = [s for s in steps if s != "incoherence"]
    rounding = [s for s in steps if s in ("rtn", "gptq")]
    if len(rounding) > 1 or (rounding and steps[-1] not in ("rtn", "gptq")):
        raise ValueError(f"{where}: one rounding step (rtn or gptq), last")
    head = [s for s in steps if s not in ("rtn", "gptq")]
    if head not in ([], ["smooth"], ["awq"]):
        raise ValueError(f"{where}: steps before the rounding are one of smooth or awq, got {', '.join(head)}")
    if not head:
        return rounding[0] if rounding else "rtn"
    return "+".join(head + (["gptq"] if rounding == ["gptq"] else []))


def parse_recipe(data, name: str) -> Recipe:
    where = f"recipe {name}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a recipe is a mapping with {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(KEYS)})")
    steps = data.get("steps") or []
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{where}: steps must be a non-empty list")
    parsed = [_step(s, f"{where} step {i + 1}") for i, s in enumerate(steps)]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a step appears twice")
    if "weights" not in data:
        raise ValueError(f"{where}: weights (a plan: {{default: FORMAT}}) is required")
    try:
        weights = FormatPlan.from_dict(data["weights"], origin=f"recipe {name}")
        acts = None if data.get("activations") is None else \
            FormatPlan.from_dict(data["activations"], origin=f"recipe {name}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return Recipe(name, str(data.get("description", "")), _method(names, where), dict(parsed), weights, acts,
                  _kv(data.get("kv_cache"), where))


def _kv(entry, where: str):
    """kv_cache: {k: FORMAT, v: FORMAT, rotate: BOOL} -> KvQuant (None when absent)."""
    from ..formats.activation import act_format_from_name
    from ..nn.kv_attention import KvQuant

    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) - {"k", "v", "rotate"}:
        raise ValueError(f"{where}: kv_cache is {{k: FORMAT, v: FORMAT, rotate: true|false}}")
    try:
        return KvQuant(*(None if entry.get(x) is None else act_format_from_name(str(entry[x])) for x in ("k", "v")),
                       rotate=bool(entry.get("rotate", False)))
    except ValueError as e:
        raise ValueError(f"{where}: kv_cache: {e}") from None


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe file (.yaml/.yml/.json). ValueError lists the built-ins."""
    import yaml

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        if name_or_path not in builtin_names():
            raise ValueError(f"unknown recipe {name_or_path!r} (known: {', '.join(builtin_names())}; or a .yaml file)")
        path = HERE / f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_recipe(data, path.stem)
