"""Fast reader for the key/value metadata section of a GGUF file.

``gguf.GGUFReader`` parses every tensor and builds one Python object per array
element; for a 262k-token vocabulary that takes tens of seconds.  Building a
tokenizer only needs the metadata key/value pairs at the start of the file, so
this module walks just that section with ``struct`` and ``numpy`` (numeric
arrays are read in one ``frombuffer`` call, string arrays in a tight loop) and
stops before the tensor infos.  A 262k-token vocabulary loads in well under a
second.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_gguf_metadata"]

_GGUF_MAGIC = b"GGUF"

# GGUF value type ids (gguf spec, GGUFValueType).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12

_SCALAR_FORMATS = {
    _UINT8: "B",
    _INT8: "b",
    _UINT16: "H",
    _INT16: "h",
    _UINT32: "I",
    _INT32: "i",
    _FLOAT32: "f",
    _BOOL: "?",
    _UINT64: "Q",
    _INT64: "q",
    _FLOAT64: "d",
}
_NUMPY_DTYPES = {
    _UINT8: "u1",
    _INT8: "i1",
    _UINT16: "u2",
    _INT16: "i2",
    _UINT32: "u4",
    _INT32: "i4",
    _FLOAT32: "f4",
    _BOOL: "u1",
    _UINT64: "u8",
    _INT64: "i8",
    _FLOAT64: "f8",
}


class _Cursor:
    __slots__ = ("buf", "pos", "endian")

    def __init__(self, buf: Any, endian: str) -> None:
        self.buf = buf
        self.pos = 0
        self.endian = endian

    def unpack(self, fmt: str) -> Any:
        st = struct.Struct(self.endian + fmt)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def raw_string(self) -> bytes:
        n = self.unpack("Q")
        start = self.pos
        self.pos += n
        if self.pos > len(self.buf):
            raise ValueError("truncated GGUF string")
        return bytes(self.buf[start : self.pos])


def _read_value(cur: _Cursor, vtype: int, keep: bool) -> Any:
    if vtype == _STRING:
        raw = cur.raw_string()
        return raw.decode("utf-8", errors="replace") if keep else None
    if vtype in _SCALAR_FORMATS:
        value = cur.unpack(_SCALAR_FORMATS[vtype])
        return value
    if vtype == _ARRAY:
        itype = cur.unpack("I")
        n = cur.unpack("Q")
        if itype in _NUMPY_DTYPES:
            dtype = np.dtype(_NUMPY_DTYPES[itype]).newbyteorder(cur.endian)
            nbytes = n * dtype.itemsize
            arr = None
            if keep:
                arr = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=cur.pos).copy()
                if itype == _BOOL:
                    arr = arr.astype(bool)
            cur.pos += nbytes
            return arr
        if itype == _STRING:
            return _read_string_array(cur, n, keep)
        # Nested arrays: rare; parse element by element.
        return [_read_value(cur, itype, keep) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def _read_string_array(cur: _Cursor, n: int, keep: bool) -> list[bytes] | None:
    buf, pos = cur.buf, cur.pos
    size_fmt = struct.Struct(cur.endian + "Q")
    unpack_from = size_fmt.unpack_from
    out: list[bytes] = []
    append = out.append
    for _ in range(n):
        (length,) = unpack_from(buf, pos)
        pos += 8
        if keep:
            append(buf[pos : pos + length])
        pos += length
    if pos > len(buf):
        raise ValueError("truncated GGUF string array")
    cur.pos = pos
    return out if keep else None


def read_gguf_metadata(path: str | Path, prefixes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Return the GGUF metadata key/value pairs of ``path``.

    Strings come back as ``str``, numeric arrays as numpy arrays and string
    arrays as lists of raw ``bytes`` (token texts are decoded by the caller,
    which knows how to treat invalid UTF-8).  With ``prefixes`` only keys that
    start with one of them are materialised (the rest are skipped cheaply).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise ValueError(f"{path}: not a GGUF file") from exc
    try:
        if mm[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
        endian = "<"
        (version,) = struct.unpack_from("<I", mm, 4)
        if version & 0xFFFF == 0:  # written on a big-endian host
            endian = ">"
            (version,) = struct.unpack_from(">I", mm, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need >= 2)")
        cur = _Cursor(mm, endian)
        cur.pos = 8
        cur.unpack("Q")  # tensor count
        n_kv = cur.unpack("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.raw_string().decode("utf-8", errors="replace")
            vtype = cur.unpack("I")
            keep = prefixes is None or key.startswith(prefixes)
            value = _read_value(cur, vtype, keep)
            if keep:
                meta[key] = value
        return meta
    finally:
        mm.close()
