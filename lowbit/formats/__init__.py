"""Quantization formats: integer, NormalFloat, FP8 and MXFP4, with bit packing.

Every format turns a float weight W_f [out, in] into a QTensor (unpacked uint8 codes plus
scales / zero-points) and back; pack()/unpack() give the tensors stored on disk.
"""
from __future__ import annotations

import re
from types import MappingProxyType

from lowbit.formats.base import Format, QTensor
from lowbit.formats.fp8 import FP8Format
from lowbit.formats.gguf.format import GGUFFormat
from lowbit.formats.integer import IntFormat
from lowbit.formats.mx import MXFP4Format
from lowbit.formats.normal_float import NFFormat

__all__ = [
    "Format",
    "QTensor",
    "IntFormat",
    "NFFormat",
    "FP8Format",
    "MXFP4Format",
    "GGUFFormat",
    "format_from_name",
    "format_from_dict",
    "make_format",
    "FAMILIES",
]

FAMILIES = ("int", "nf", "fp8-e4m3", "fp8-e5m2", "mxfp4", "gguf")
_CLASSES = MappingProxyType({cls.family: cls for cls in (IntFormat, NFFormat, FP8Format, MXFP4Format, GGUFFormat)})


def make_format(
    family: str = "int",
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    scale_rule: str = "absmax",
) -> Format:
    """Build a format from CLI-style arguments.

    family "int":  IntFormat(bits, symmetric, group_size, scale_rule); defaults bits=4,
        group_size=64. scale_rule "absmax_half" (symmetric only) uses all 2**bits codes.
    family "nf":   NFFormat(bits 2..4, group_size); defaults 4 / 64; symmetric must be True.
    "fp8-e4m3" / "fp8-e5m2": FP8 has no group scales, so group_size > 0 or None -> per output
        channel, 0 -> per channel, -1 -> per tensor; bits must be None or 8.
    "mxfp4": fixed E2M1 elements in blocks of 32 with E8M0 scales; bits must be None or 4 and
        group_size None or 32.
    None means "the family's default"; anything else is validated (ValueError).
    """
    if family == "int":
        return IntFormat(4 if bits is None else bits, symmetric, 64 if group_size is None else group_size,
                         scale_rule)
    if scale_rule != "absmax":
        raise ValueError(f"scale_rule applies to family 'int' only, not {family!r}")
    if family == "nf":
        if symmetric is not True:
            raise ValueError("symmetric must be True for family 'nf' (NF has no asymmetric variant)")
        return NFFormat(4 if bits is None else bits, 64 if group_size is None else group_size)
    if family in ("fp8-e4m3", "fp8-e5m2"):
        if bits not in (None, 8):
            raise ValueError(f"bits must be 8 (or omitted) for family {family!r}, got {bits!r}")
        g = 0 if group_size is None or group_size > 0 else group_size
        return FP8Format(family[len("fp8-"):], g)
    if family == "mxfp4":
        if bits not in (None, 4):
            raise ValueError(f"bits must be 4 (or omitted) for family 'mxfp4', got {bits!r}")
        if group_size not in (None, 32):
            raise ValueError(f"group_size must be 32 (or omitted) for family 'mxfp4', got {group_size!r}")
        return MXFP4Format()
    if family == "gguf":
        raise ValueError("a GGUF format is named by its type: GGUFFormat('Q4_K') or format_from_name('Q4_K')")
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def format_from_dict(d: dict) -> Format:
    """Inverse of Format.to_dict(): format_from_dict(fmt.to_dict()) == fmt."""
    if not isinstance(d, dict) or d.get("family") not in _CLASSES:
        raise ValueError(f"d['family'] must be one of {tuple(_CLASSES)}, got {d!r}")
    cls = _CLASSES[d["family"]]
    kwargs = {k: v for k, v in d.items() if k != "family"}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad fields for family {d['family']!r}: {err}") from None


_NAME = re.compile(r"^(int|nf)(\d)-(g\d+|ch|tensor)(?:-(sym|asym))?(-half|-signed)?$")


def format_from_name(name: str) -> Format:
    """A format from its short name, as Format.name writes it and a plan file uses it:
    "int4-g128-sym", "int3-g64-asym", "int4-ch-sym-signed", "nf4-g64", "fp8-e4m3-ch",
    "mxfp4", or a GGUF type ("Q4_K", "Q6_K", "Q8_0", ...). ValueError names what is accepted."""
    from lowbit.formats.gguf.format import check_type_name

    if not isinstance(name, str) or not name:
        raise ValueError(f"a format name must be a non-empty string, got {name!r}")
    if name[0] in "QI" and name.upper() == name:
        check_type_name(name)
        return GGUFFormat(name)
    if name == "mxfp4":
        return MXFP4Format()
    if name.startswith("fp8-"):
        kind, _, scope = name[len("fp8-"):].partition("-")
        groups = {"ch": 0, "tensor": -1, "": 0}
        if kind in ("e4m3", "e5m2") and scope in groups:
            return FP8Format(kind, groups[scope])
    m = _NAME.match(name)
    if m:
        family, bits, scope, kind, rule = m.groups()
        group = {"ch": 0, "tensor": -1}.get(scope) if scope in ("ch", "tensor") else int(scope[1:])
        rule = {None: "absmax", "-half": "absmax_half", "-signed": "signed"}[rule]
        if family == "int":
            return IntFormat(int(bits), kind != "asym", group, rule)
        if kind in (None, "sym") and rule == "absmax":
            return NFFormat(int(bits), group)
    raise ValueError(f"unknown format name {name!r}: use int<b>-g<N>|ch|tensor-sym|asym[-half|-signed] "
                     "(int4-g128-sym), nf<b>-g<N>, fp8-e4m3-ch, mxfp4, or a GGUF type (Q4_K, Q6_K, Q8_0, ...)")
