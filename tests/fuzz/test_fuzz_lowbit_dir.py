"""lowbit directories that lie: lowbit.json with values replaced, keys dropped or the wrong types, and
weights.safetensors truncated, flipped or with a header that lies about dtypes, shapes and offsets.
Loading one works or ends in one LowbitError line; the files are never modified."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import FAST, SLOW, reads_or_refuses

from lowbit.models.load import load

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    from lowbit.cli.main import main

    out = tmp_path_factory.mktemp("fuzz_lowbit") / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group", "32",
                 "--out", str(out)]) == 0
    return out


def _paths(d: dict, prefix=()):
    """Every key path of a JSON object (objects and lists)."""
    yield prefix
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _copy(saved, tmp_path):
    d = tmp_path / "q"
    shutil.copytree(saved, d)
    return d


def _load_checked(d):
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.is_file()}
    reads_or_refuses(load, str(d))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.is_file()} == digests


@FAST
@given(pick=st.floats(0, 1), value=JSON, drop=st.booleans())
def test_a_lying_manifest_loads_or_is_refused(saved, tmp_path_factory, pick, value, drop):
    d = _copy(saved, tmp_path_factory.mktemp("m"))
    manifest = json.loads((d / "lowbit.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    path = paths[int(pick * (len(paths) - 1))]
    holder = manifest
    for k in path[:-1]:
        holder = holder[k]
    if drop and isinstance(holder, dict):
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    (d / "lowbit.json").write_text(json.dumps(manifest))
    _load_checked(d)


HEADER_LIE = st.tuples(st.floats(0, 1), st.sampled_from(["dtype", "shape", "data_offsets"]),
                       st.sampled_from(["F32", "F16", "I8", "U8", "I64", "BOOL", "X9"]) | st.lists(
                           st.integers(-1, 2**40), max_size=4))


def _lie_in_header(raw: bytes, lie) -> bytes:
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[names[int(lie[0] * (len(names) - 1))]]
    entry[lie[1]] = lie[2]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


@FAST
@given(lie=HEADER_LIE)
def test_a_safetensors_header_that_lies_is_refused(saved, tmp_path_factory, lie):
    d = _copy(saved, tmp_path_factory.mktemp("s"))
    w = next(d.glob("*.safetensors"))
    w.write_bytes(_lie_in_header(w.read_bytes(), lie))
    _load_checked(d)


@FAST
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))
def test_truncated_or_flipped_weights_are_refused(saved, tmp_path_factory, cut, flips):
    d = _copy(saved, tmp_path_factory.mktemp("t"))
    w = next(d.glob("*.safetensors"))
    raw = bytearray(w.read_bytes())
    n = 8 + struct.unpack_from("<Q", raw)[0]
    for where, value in flips:                                # in the header: its JSON and its length
        raw[int(where * (n - 1))] = value
    w.write_bytes(bytes(raw[: max(1, int(cut * len(raw)))] if cut < 0.5 else raw))
    _load_checked(d)


@pytest.mark.slow
@SLOW
@given(pick=st.floats(0, 1), value=JSON, lie=HEADER_LIE)
def test_manifest_and_header_lies_together(saved, tmp_path_factory, pick, value, lie):
    d = _copy(saved, tmp_path_factory.mktemp("b"))
    w = next(d.glob("*.safetensors"))
    w.write_bytes(_lie_in_header(w.read_bytes(), lie))
    manifest = json.loads((d / "lowbit.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    holder = manifest
    path = paths[int(pick * (len(paths) - 1))]
    for k in path[:-1]:
        holder = holder[k]
    holder[path[-1]] = value
    (d / "lowbit.json").write_text(json.dumps(manifest))
    _load_checked(d)


@FAST
@given(lie=HEADER_LIE, cut=st.floats(0, 1))
def test_an_hf_directory_whose_safetensors_lie_is_refused(tiny_llama_dir, tmp_path_factory, lie, cut):
    d = tmp_path_factory.mktemp("hf") / "m"
    shutil.copytree(tiny_llama_dir, d)
    w = next(d.glob("*.safetensors"))
    raw = _lie_in_header(w.read_bytes(), lie)
    w.write_bytes(raw[: int(cut * len(raw))] if cut < 0.3 else raw)
    _load_checked(d)
