"""Array objects of the service, ``{"dtype", "shape", "encoding", "data"}``, to and from numpy.

Binary data is little-endian and C-ordered; ``zstd+base64`` needs the optional
``zstandard`` package (``pip install "depass-client[zstd]"``). Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import importlib.util
import math
from typing import Any

import numpy as np

from depass_client._errors import DePassError

DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}


def has_zstd() -> bool:
    """Whether the ``zstandard`` package is installed."""
    return importlib.util.find_spec("zstandard") is not None


def default_encoding() -> str:
    """The best encoding this environment can decode."""
    return "zstd+base64" if has_zstd() else "base64"


def decode(obj: dict[str, Any] | None) -> np.ndarray | None:
    """A numpy array (in the wire dtype) from an array object; None stays None."""
    if obj is None:
        return None
    try:
        dtype = DTYPES[obj["dtype"]]
        shape = tuple(int(d) for d in obj["shape"])
        encoding, data = obj["encoding"], obj["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DePassError(f"malformed array object: {exc!r}") from exc
    if encoding == "list":
        return np.asarray(data, dtype=dtype).reshape(shape)
    raw = base64.b64decode(data)
    if encoding == "zstd+base64":
        if not has_zstd():
            raise DePassError(
                "this array is zstd-compressed; pip install 'depass-client[zstd]' or ask "
                "for array_encoding='base64'"
            )
        import zstandard

        expected = math.prod(shape) * dtype.itemsize
        raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=expected)
    elif encoding != "base64":
        raise DePassError(f"unknown array encoding {encoding!r}; upgrade depass-client")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def encode(array: Any, encoding: str | None = None) -> dict[str, Any]:
    """The array object of ``array`` in float32, to send (e.g. as ``subspace``)."""
    wire = np.ascontiguousarray(array, dtype=DTYPES["float32"])
    encoding = encoding or default_encoding()
    data: Any
    if encoding == "list":
        data = wire.tolist()
    else:
        raw = wire.tobytes()
        if encoding == "zstd+base64":
            import zstandard

            raw = zstandard.ZstdCompressor(level=3).compress(raw)
        elif encoding != "base64":
            raise DePassError(f"unknown array encoding {encoding!r}")
        data = base64.b64encode(raw).decode("ascii")
    return {"dtype": "float32", "shape": list(wire.shape), "encoding": encoding, "data": data}
