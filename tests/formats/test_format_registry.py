"""make_format, format_from_dict round trips, QTensor validation."""
import json

import pytest
import torch

from lowbit.formats import (FP8Format, IntFormat, MXFP4Format, NFFormat, QTensor,
                            format_from_dict, make_format)

ALL = [IntFormat(4, True, 64), IntFormat(3, False, 0, "absmax"), IntFormat(8, True, -1, "absmax_half"),
       NFFormat(4, 64), NFFormat(2, 0), FP8Format("e4m3", 0), FP8Format("e5m2", -1), MXFP4Format()]


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_dict_round_trip(fmt):
    d = json.loads(json.dumps(fmt.to_dict()))
    assert "family" in d
    assert format_from_dict(d) == fmt
    assert format_from_dict(d).name == fmt.name


def test_make_format_names():
    assert make_format().name == "int4-g64-sym"
    assert make_format("int", 4, 64, False).name == "int4-g64-asym"
    assert make_format("int", 8, 0).name == "int8-ch-sym"
    assert make_format("int", 4, -1).name == "int4-tensor-sym"
    assert make_format("nf").name == "nf4-g64"
    assert make_format("nf", 3, 128).name == "nf3-g128"
    assert make_format("fp8-e4m3").name == "fp8-e4m3-ch"
    assert make_format("int", 2, 64, True, "absmax_half").name == "int2-g64-sym-half"
    assert make_format("fp8-e4m3", group_size=64).name == "fp8-e4m3-ch"
    assert make_format("fp8-e5m2", group_size=-1).name == "fp8-e5m2-tensor"
    assert make_format("mxfp4") == MXFP4Format()
    assert make_format("mxfp4", 4, 32).name == "mxfp4"


@pytest.mark.parametrize("args", [("int", 1), ("int", 9), ("int", 4, -2), ("foo",), ("nf", 5),
                                  ("mxfp4", 4, 64), ("mxfp4", 8), ("fp8-e4m3", 4), ("nf", 4, 64, False),
                                  ("int", 4, 64, False, "absmax_half"), ("nf", 4, 64, True, "absmax_half"),
                                  ("int", 4, 64, True, "minmax")])
def test_make_format_invalid(args):
    with pytest.raises(ValueError):
        make_format(*args)


def test_unknown_family_lists_known():
    with pytest.raises(ValueError, match="mxfp4"):
        make_format("int2")
    with pytest.raises(ValueError):
        format_from_dict({"family": "int", "bits": 4, "colour": "red"})
    with pytest.raises(ValueError):
        format_from_dict({"family": "zz"})


def test_qtensor_validates():
    fmt = IntFormat(4, True, 32)
    q = fmt.quantize(torch.randn(4, 64))
    with pytest.raises(ValueError):
        QTensor(q.codes.int(), q.scales, None, (4, 64), fmt)
    with pytest.raises(ValueError):
        QTensor(q.codes, q.scales.float(), None, (4, 64), fmt)
    with pytest.raises(ValueError):
        QTensor(q.codes, q.scales, q.codes[:, :2], (4, 64), fmt)
    with pytest.raises(ValueError):
        fmt.quantize(torch.randn(4, 64, 2))


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_nan_weights_raise(fmt):
    W_f = torch.randn(4, 64)
    W_f[3, 5] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        fmt.quantize(W_f)
