"""GGUF files that lie: truncated, bytes flipped, header counts and tensor shapes / types / offsets
replaced by arbitrary integers. Loading one either works or ends in one LowbitError line — never
another exception, a hang or a huge allocation; the input file is never modified."""
from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from export.gguf_support import with_merges
from fuzz_support import FAST, SLOW, reads_or_refuses

from lowbit.errors import LowbitError
from lowbit.export.gguf.writer import write_gguf
from lowbit.models.gguf_check import open_gguf
from lowbit.models.load import load
from lowbit.models.tokenizer import tokenizer_from_gguf

U64 = st.integers(0, 2**64 - 1)


@pytest.fixture(scope="module")
def gguf_bytes(tiny_llama_dir, tmp_path_factory):
    src = with_merges(tiny_llama_dir, tmp_path_factory.mktemp("fuzz_gguf_src"))
    path = write_gguf(str(src), tmp_path_factory.mktemp("fuzz_gguf") / "tiny.gguf").path
    return path.read_bytes()


def _tensor_fields(data: bytes) -> list[int]:
    """Byte offsets of every tensor's n_dims field (found after its name in the header)."""
    out, at = [], 0
    for name in (b"token_embd.weight", b"blk.0.attn_q.weight", b"blk.1.ffn_down.weight", b"output_norm.weight"):
        at = data.find(name)
        if at > 0:
            out.append(at + len(name))
    return out


def _load_everything(path):
    reader = open_gguf(path)
    for t in reader.tensors:
        t.data.sum()                                  # every tensor's bytes are inside the file
    tokenizer_from_gguf(path)
    return load(str(path))


def _mutated(tmp_path, data: bytes):
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    reads_or_refuses(_load_everything, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest          # never written to


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))             # float caches of fuzzed files


MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("header"), st.sampled_from([8, 16]), U64),
    st.tuples(st.just("tensor"), st.integers(0, 3), st.sampled_from(["n_dims", "dim0", "type", "offset"]), U64),
)


def _apply(data: bytes, m) -> bytes:
    b = bytearray(data)
    if len(b) < 24:                                    # already cut short: nothing left to lie about
        return data
    if m[0] == "truncate":
        return bytes(b[: int(m[1] * (len(b) - 1))])
    if m[0] == "flip":
        for where, value in m[1]:
            b[int(where * (len(b) - 1))] = value
        return bytes(b)
    if m[0] == "header":
        b[m[1]:m[1] + 8] = struct.pack("<Q", m[2])
        return bytes(b)
    fields = _tensor_fields(data)
    if not fields:
        return data
    at = fields[m[1] % len(fields)]
    n_dims = struct.unpack_from("<I", b, at)[0] if at + 4 <= len(b) else 0
    where = {"n_dims": (at, "<I"), "dim0": (at + 4, "<Q"), "type": (at + 4 + 8 * min(n_dims, 4), "<I"),
             "offset": (at + 8 + 8 * min(n_dims, 4), "<Q")}[m[2]]
    if where[0] + struct.calcsize(where[1]) > len(b):
        return data
    value = m[3] % 2**32 if where[1] == "<I" else m[3]
    struct.pack_into(where[1], b, where[0], value)
    return bytes(b)


@FAST
@given(m=MUTATION)
def test_a_lying_gguf_loads_or_is_refused_in_one_line(gguf_bytes, tmp_path, m):
    _mutated(tmp_path, _apply(gguf_bytes, m))


@pytest.mark.slow
@SLOW
@given(m=st.lists(MUTATION, min_size=1, max_size=4))
def test_a_lying_gguf_loads_or_is_refused_in_one_line_many(gguf_bytes, tmp_path, m):
    data = gguf_bytes
    for one in m:
        data = _apply(data, one)
    _mutated(tmp_path, data)


def test_a_gguf_with_a_misnamed_tensor_is_refused_not_randomly_initialized(gguf_bytes, tmp_path):
    # regression (found by the fuzzer): transformers left the tensor at random initialization, silently
    data = gguf_bytes.replace(b"blk.1.attn_q.weight", b"blk.1.attn_X.weight", 1)
    path = tmp_path / "misnamed.gguf"
    path.write_bytes(data)
    with pytest.raises(LowbitError, match="lacks 1 of the model's tensors"):
        load(str(path))
