"""A bounded structural check of a GGUF file before anything else parses it.

gguf.GGUFReader and transformers trust the header: a corrupted count can make them allocate or
loop for a very long time, and a truncated file can yield short tensors without an error. This
walks the header with every length checked against the bytes that remain (so the work is bounded
by the file size), then checks that every tensor's data lies inside the file. Any problem is one
LowbitError line naming the file and what is wrong.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from ..errors import LowbitError

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class _Cursor:
    """Little-endian reads that refuse to run past the end of the buffer."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise ValueError(f"{what} runs past the end of the file (needs {n} bytes at offset {self.at})")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.u64(f"{what} length"), what)


def _shown(raw: bytes) -> str:
    """A name read from the file as it may appear in a one-line message: printable, at most 60 characters."""
    text = raw[:60].decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text + ("…" if len(raw) > 60 else "")


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR:
        raw = cur.take(_SCALAR[vtype], f"value of {key}")
        return struct.unpack("<I", raw)[0] if vtype == 4 else None
    if vtype == _STRING:
        cur.string(f"string value of {key}")
        return None
    if vtype == _ARRAY and depth == 0:
        etype, count = cur.u32(f"array type of {key}"), cur.u64(f"array length of {key}")
        if etype in _SCALAR:
            cur.take(count * _SCALAR[etype], f"array {key}")
        elif etype == _STRING:
            if count * 8 > len(cur.data) - cur.at:  # every string needs at least its 8-byte length
                raise ValueError(f"array {key} claims {count} strings, more than the file can hold")
            for _ in range(count):
                cur.string(f"an element of {key}")
        else:
            raise ValueError(f"array {key} has unsupported element type {etype}")
        return None
    raise ValueError(f"key {key} has unknown value type {vtype}")


def check_gguf(path: str | Path) -> None:
    """Raise LowbitError (one line) unless `path` is a structurally sound GGUF v2/v3 file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise LowbitError(f"{path.name} is not a valid GGUF file: only {os.fstat(f.fileno()).st_size} bytes")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # only the header pages are read
    except OSError as e:
        raise LowbitError(f"cannot read {path}: {e.strerror}") from None
    try:
        _check(data, path)
    finally:
        data.close()


def _check(data, path: Path) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(data)
    try:
        if cur.take(4, "magic") != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        version = cur.u32("version")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key/value count")
        if n_tensors * 24 + n_kv * 13 > len(data):  # smallest tensor info / key-value entry
            raise ValueError(f"header claims {n_tensors} tensors and {n_kv} keys, more than the file can hold")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = _shown(cur.string("key"))
            value = _value(cur, cur.u32(f"type of {key}"), key)
            if key == "general.alignment":
                if not value or value & (value - 1):
                    raise ValueError(f"general.alignment {value} is not a power of two")
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = _shown(cur.string("tensor name"))
            n_dims = cur.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = [cur.u64(f"shape of {name}") for _ in range(n_dims)]
            type_id, offset = cur.u32(f"type of {name}"), cur.u64(f"offset of {name}")
            infos.append((name, dims, type_id, offset))
        data_start = -(-cur.at // alignment) * alignment
        for name, dims, type_id, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has unknown type id {type_id}") from None
            n = 1
            for d in dims:
                n *= d
            if n == 0 or dims[0] % block:
                raise ValueError(f"tensor {name} has shape {dims}, not whole blocks of {block}")
            end = data_start + offset + n // block * type_size
            if end > len(data):
                raise ValueError(f"tensor {name} is truncated: its data ends at byte {end}, "
                                 f"the file has {len(data)}")
    except ValueError as e:
        raise LowbitError(f"{path.name} is not a valid GGUF file: {e}") from None


def open_gguf(path: str | Path):
    """A gguf.GGUFReader of a file that passed check_gguf; any reader error as one LowbitError line."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted errors on bad files
        raise LowbitError(f"{Path(path).name} is not a valid GGUF file: {type(e).__name__}: {e}") from None
