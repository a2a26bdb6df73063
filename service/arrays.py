"""Arrays on the wire: ``{"dtype", "shape", "encoding", "data"}``.

Encodings:

* ``zstd+base64``: the array's bytes (little-endian, C order), zstandard-compressed, then
  base64. The default for large arrays: attribution states are half zeros (a position
  mixes no later token), so they compress well.
* ``base64``: the raw bytes, base64 (for clients without zstandard).
* ``list``: JSON nested lists (exact: every float32 or float16 is a JSON double exactly).

Arrays sent by clients are decoded with :func:`numpy.frombuffer` or from JSON numbers
only: nothing is ever unpickled, and every size is checked before any allocation.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any, Literal

import numpy as np
import zstandard

Encoding = Literal["zstd+base64", "base64", "list"]
RequestedEncoding = Literal["auto", "zstd+base64", "base64", "list"]
WireDtype = Literal["float32", "float16"]

#: dtypes a client may send, by wire name (little-endian).
INPUT_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
ENCODINGS: tuple[str, ...] = ("zstd+base64", "base64", "list")
#: ``auto`` writes arrays up to this many elements as JSON lists, larger ones compressed.
AUTO_LIST_MAX_ELEMENTS = 64
MAX_NDIM = 8
ZSTD_LEVEL = 3


class ArrayDecodeError(ValueError):
    """An array object that cannot be decoded; the message says why."""


def resolve_encoding(encoding: RequestedEncoding, size: int) -> Encoding:
    """The encoding ``auto`` stands for at this many elements."""
    if encoding != "auto":
        return encoding
    return "list" if size <= AUTO_LIST_MAX_ELEMENTS else "zstd+base64"


def encode_array(
    array: np.ndarray, encoding: RequestedEncoding = "auto", dtype: WireDtype = "float32"
) -> dict[str, Any]:
    """The wire object of ``array`` cast to ``dtype``."""
    wire = np.ascontiguousarray(array, dtype=INPUT_DTYPES[dtype])
    chosen = resolve_encoding(encoding, wire.size)
    data: Any
    if chosen == "list":
        data = wire.tolist()
    else:
        raw = wire.tobytes()
        if chosen == "zstd+base64":
            raw = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        data = base64.b64encode(raw).decode("ascii")
    return {"dtype": dtype, "shape": list(wire.shape), "encoding": chosen, "data": data}


def decode_array(
    *, dtype: str, shape: list[int], encoding: str, data: Any, max_bytes: int
) -> np.ndarray:
    """A float32 array from its wire object, checked at every step.

    Args:
        max_bytes: the largest decoded size accepted, checked before decompressing.

    Raises:
        ArrayDecodeError: unknown dtype or encoding, bad shape, bad base64 or zstd data, a
            byte length or list shape that disagrees with ``shape``, or non-finite values.
    """
    if dtype not in INPUT_DTYPES:
        raise ArrayDecodeError(f"dtype must be one of {', '.join(INPUT_DTYPES)}; got {dtype!r}")
    if encoding not in ENCODINGS:
        raise ArrayDecodeError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    if not 1 <= len(shape) <= MAX_NDIM or any(d < 1 for d in shape):
        raise ArrayDecodeError(f"shape must list 1 to {MAX_NDIM} positive sizes; got {shape}")
    item = INPUT_DTYPES[dtype]
    count = math.prod(shape)
    nbytes = count * item.itemsize
    if nbytes > max_bytes:
        raise ArrayDecodeError(f"shape {shape} needs {nbytes} bytes, over the limit {max_bytes}")
    if encoding == "list":
        array = _from_list(data, shape)
    else:
        array = _from_binary(data, encoding, item, nbytes).reshape(shape)
    with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
        result = array.astype(np.float32)  # a writable copy, detached from the request body
    if not np.isfinite(result).all():
        raise ArrayDecodeError("must hold finite float32 numbers only (no NaN or infinity)")
    return result


def _from_binary(data: Any, encoding: str, item: np.dtype, nbytes: int) -> np.ndarray:
    if not isinstance(data, str):
        raise ArrayDecodeError(f"data must be a base64 string for encoding {encoding!r}")
    if len(data) > 4 * (nbytes // 3 + 1) + 4 and encoding == "base64":
        raise ArrayDecodeError("data is longer than the shape allows")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ArrayDecodeError(f"data is not valid base64: {exc}") from exc
    if encoding == "zstd+base64":
        # A frame's declared content size is not trusted: read at most one byte too many.
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                raw = reader.read(nbytes + 1)
        except zstandard.ZstdError as exc:
            raise ArrayDecodeError(f"data is not a valid zstandard frame: {exc}") from exc
    if len(raw) != nbytes:
        held = f"more than {nbytes}" if len(raw) > nbytes else str(len(raw))
        raise ArrayDecodeError(f"data holds {held} bytes; shape and dtype need exactly {nbytes}")
    return np.frombuffer(raw, dtype=item)


def _from_list(data: Any, shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise ArrayDecodeError("data must be nested lists of numbers for encoding 'list'")
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise ArrayDecodeError(f"data is not a regular nested list: {exc}") from exc
    if array.dtype.kind not in "fiu":
        raise ArrayDecodeError("data must hold numbers only")
    if list(array.shape) != list(shape):
        raise ArrayDecodeError(f"data has shape {list(array.shape)}; shape says {shape}")
    return array.astype(np.float64, copy=False)
