"""FormatPlan: the one answer to "which format goes where", per tensor.

A plan is an ordered list of rules (a full module name or an fnmatch pattern -> a Format, or
None for "keep float"); the first rule that matches a tensor wins, and `default` covers every
tensor no rule names. Uniform --bits/--group/--sym is a plan with a default and no rules; a
llama.cpp mix (Q4_K_M, ...) is a plan with one exact rule per tensor (plans/gguf_mixes.py);
a user or the planner writes one as a small JSON or YAML file:

    {"default": "int4-g128-sym",
     "tensors": {"model.layers.*.mlp.down_proj": "Q6_K",
                 "model.layers.0.*": "float"}}

Formats are written by name (lowbit.formats.format_from_name) or as Format.to_dict() objects.
An optional "outliers" map gives tensors (names or patterns, first match wins) their own
dense-and-sparse share, e.g. {"model.layers.3.mlp.down_proj": 0.005} (`lowbit plan
--outlier-shares` writes it; GPTQ keeps that share of the tensor in float16).
The same class plans activation formats (lowbit.formats.activation: "a8-token-sym", …): a
QuantizeConfig holds one plan for the weights and one for the linears' inputs.
"""
from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lowbit.formats import Format, format_from_dict, format_from_name
from lowbit.formats.activation import ActFormat, act_format_from_dict, act_format_from_name

FLOAT = "float"


def _format(value, where: str) -> Format | None:
    """A plan file's format entry -> Format, or None for "float"."""
    if value is None or value == FLOAT:
        return None
    try:
        if isinstance(value, str):
            return act_format_from_name(value) if value.startswith("a") and value[1:2].isdigit() \
                else format_from_name(value)
        if isinstance(value, Mapping):
            return act_format_from_dict(dict(value)) if value.get("family") == "act" else format_from_dict(dict(value))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: a format is a name (\"int4-g128-sym\", \"Q4_K\", \"float\") or an object, got {value!r}")


def _entry(fmt: Format | None) -> str:
    return FLOAT if fmt is None else fmt.name


@dataclass(frozen=True)
class FormatPlan:
    """rules: ((pattern, Format | None), ...) in priority order; default: the rest (None: float)."""

    rules: tuple[tuple[str, Format | None], ...] = ()
    default: Format | None = None
    origin: str = "uniform"          # where the plan came from, for lowbit.json and messages
    outliers: tuple[tuple[str, float], ...] = ()   # (pattern, share kept in float16) per tensor

    def __post_init__(self):
        for rule in self.outliers:
            if len(rule) != 2 or not isinstance(rule[0], str) or not rule[0] or isinstance(rule[1], bool) \
                    or not isinstance(rule[1], (int, float)) or not 0 <= rule[1] < 0.1:
                raise ValueError(f"a plan outlier rule is (pattern, share in [0, 0.1)), got {rule!r}")
        for rule in self.rules:
            if len(rule) != 2 or not isinstance(rule[0], str) or not rule[0]:
                raise ValueError(f"a plan rule is (pattern, format), got {rule!r}")
            if rule[1] is not None and not isinstance(rule[1], (Format, ActFormat)):
                raise ValueError(f"plan rule {rule[0]}: not a Format: {rule[1]!r}")
        if self.default is not None and not isinstance(self.default, (Format, ActFormat)):
            raise ValueError(f"plan default: not a Format: {self.default!r}")

    @classmethod
    def uniform(cls, fmt: Format | ActFormat, keep_float: Sequence[str] = ()) -> "FormatPlan":
        """Every tensor in `fmt`, except those matching `keep_float` (kept in float)."""
        return cls(tuple((p, None) for p in keep_float), fmt)

    def keep_float(self, patterns: Sequence[str]) -> "FormatPlan":
        """The same plan with `patterns` kept in float ahead of every other rule."""
        return FormatPlan(tuple((p, None) for p in patterns) + self.rules, self.default, self.origin, self.outliers)

    def format_for(self, name: str) -> Format | None:
        for pattern, fmt in self.rules:
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                return fmt
        return self.default

    def outlier_share(self, name: str) -> float | None:
        """The tensor's own dense-and-sparse share (None: the plan gives it none)."""
        for pattern, share in self.outliers:
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                return float(share)
        return None

    def resolve(self, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Format | None]:
        """{name: Format or None} for `names` (always planned) and those of `optional` (the embedding,
        the head) that a rule names explicitly. ValueError for a rule that matches no tensor."""
        candidates = list(names) + [n for n in optional if n not in names]
        for pattern, _ in self.rules + self.outliers:
            if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in candidates):
                raise ValueError(f"plan rule {pattern!r} matches no tensor of this model "
                                 f"(e.g. {candidates[0]}, {candidates[-1]})")
        out = {n: self.format_for(n) for n in names}
        for n in optional:
            if n not in out and any(n == p or fnmatch.fnmatchcase(n, p) for p, _ in self.rules):
                out[n] = self.format_for(n)
        return out

    # --- files ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"origin": self.origin, "default": _entry(self.default),
             "tensors": {pattern: _entry(fmt) for pattern, fmt in self.rules}}
        if self.outliers:
            d["outliers"] = {pattern: share for pattern, share in self.outliers}
        return d

    @classmethod
    def from_dict(cls, d: Mapping, origin: str = "file") -> "FormatPlan":
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan is an object with \"default\" and \"tensors\", got {type(d).__name__}")
        unknown = set(d) - {"default", "tensors", "origin", "outliers"}
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)} (known: default, tensors, origin, outliers)")
        outliers = d.get("outliers", {})
        if not isinstance(outliers, Mapping):
            raise ValueError("plan \"outliers\" must map a name or pattern to a share (0.005 = 0.5%)")
        tensors = d.get("tensors", {})
        if not isinstance(tensors, Mapping):
            raise ValueError("plan \"tensors\" must map a name or pattern to a format")
        rules = tuple((str(p), _format(v, f"plan tensor {p!r}")) for p, v in tensors.items())
        # a file's own "origin" (what it was written from) is kept out: the file may have been edited since
        return cls(rules, _format(d.get("default", FLOAT), "plan default"), origin,
                   tuple((str(p), v) for p, v in outliers.items()))

    @classmethod
    def load(cls, path) -> "FormatPlan":
        """A plan from a .json, .yaml or .yml file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read plan {path}: {e.strerror or e}") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 -- any parse error is one line for the user
            raise ValueError(f"plan {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
        return cls.from_dict(data, origin=f"file {path.name}")

    def save(self, path) -> Path:
        path = Path(path)
        d = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            path.write_text(json.dumps(d, indent=1) + "\n")
        return path
