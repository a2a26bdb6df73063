"""A small reader and writer of the safetensors format, on numpy alone.

Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the tensors' bytes. Files written here open with the ``safetensors`` library, and
files it writes open here.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from depass_client._errors import DePassError

_TO_NUMPY = {
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "I8": "i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
    "U8": "u1",
    "BOOL": "?",
}
_FROM_NUMPY = {np.dtype(v).str.lstrip("<|="): k for k, v in _TO_NUMPY.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (stored in name order) and ``metadata``."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        kind = _FROM_NUMPY.get(array.dtype.str.lstrip("<|="))
        if kind is None:
            raise DePassError(f"{name}: dtype {array.dtype} has no safetensors equivalent")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": kind,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def loads(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata from safetensors bytes, checked against the buffer's size."""
    if len(data) < 8:
        raise DePassError("not a safetensors file: shorter than its header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise DePassError("not a safetensors file: header length out of range")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise DePassError(f"not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise DePassError("not a safetensors file: the header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size :]
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        try:
            dtype = np.dtype(_TO_NUMPY[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DePassError(f"safetensors entry {name!r} is malformed: {exc!r}") from exc
        if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * dtype.itemsize:
            raise DePassError(f"safetensors entry {name!r} does not fit its data")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return tensors, {str(k): str(v) for k, v in metadata.items()}
